"""Where records become segments: `Recorder` (stats, then h5py), and the writer process around it.

`python -m tensortap.capture.sink` is the writer process a tapped server starts (writer=process):
it reads frames (frames.py) on stdin, and for each batch computes every record's stats, writes the
records and commits the batch (one flush; batches that queued up in the pipe while it was busy
share one, up to 64 records), then answers "A <last batch id>". It is the only code of
such a capture that imports h5py, and it runs outside the server's GIL. End of input (the server
exited or was SIGKILLed) commits and closes the open segment. A write error is reported once
("E <records> <bytes> <message>"), the rest is counted as lost, and the segment notes the loss.

With writer=thread (or after a fallback) the server's writer thread drives a Recorder itself.
"""

from __future__ import annotations

import json
import mmap
import select
import signal
import sys
import time

import numpy as np

from tensortap.capture import frames
from tensortap.format import schema, stats
from tensortap.format.segment import PendingRecord, SegmentWriter
from tensortap.text import one_line


class Recorder:
    """Stats and segments for one writer run; `written`/`written_bytes` count what was committed (every
    batch flushed, also those before a batch that failed)."""

    def __init__(self, opening: dict):
        self.segments = SegmentWriter(opening["dir"], opening["rank"], opening["root_attrs"], opening["compress"],
                                      opening["segment_records"], opening["segment_bytes"],
                                      bool(opening.get("checksum", False)))

    @property
    def written(self) -> int:
        return self.segments.committed_records

    @property
    def written_bytes(self) -> int:
        return self.segments.committed_bytes

    @property
    def where(self) -> str:
        return self.segments.open_path or self.segments.directory

    def write(self, meta: dict, meta_json: str | None, arrays: dict, full: bool) -> None:
        """One record. `meta_json` is the metadata as the server encoded it (without stats), or None
        when `meta` is to be encoded here (writer=thread): either way it is encoded once."""
        self.segments.write(build_record(meta, meta_json, arrays, full))

    def commit(self, totals: dict) -> None:
        self.segments.totals = {f"{k}_total": int(v) for k, v in totals.items()}
        self.segments.commit()

    def close(self, totals: dict | None = None) -> None:
        if totals:
            self.segments.totals = {f"{k}_total": int(v) for k, v in totals.items()}
        self.segments.close_segment()

    def mark_failure(self, attrs: dict) -> None:
        self.segments.mark_failure(attrs)


def build_record(meta: dict, meta_json: str | None, arrays: dict, full: bool) -> PendingRecord:
    """Stats from the stored array (or from the device's stats parts when there is no "data");
    full mode keeps the tensor, stats mode its stats array instead. A stored tensor's stats are
    computed when the segment writer completes the record, while its bytes are being written."""
    data = arrays.get("data")
    dtype, point = meta["dtype"], meta["point"]
    if not schema.LOCATION_FIELDS_SET.isdisjoint(meta):  # only the segment writer says where bytes are
        for key in schema.LOCATION_FIELDS:
            meta.pop(key, None)
        meta_json = None
    if data is not None and full:
        if meta_json is None:  # encoded now: the segment writer sizes its batches by it
            meta_json = json.dumps(meta, separators=(",", ":"), allow_nan=True)
        encoded = meta_json

        def finish(rec: PendingRecord) -> None:
            scalars, _ = stats.compute(data, dtype, point, keep_arrays=False)
            rec.stats, rec.meta_json = scalars, _with_stats(meta, encoded, scalars, True)

        return PendingRecord(meta, meta_json, data, dtype, tuple(data.shape), {}, None, finish)
    if data is not None:
        shape = tuple(data.shape)
        scalars, stats_array = stats.compute(data, dtype, point, keep_arrays=True)
    else:
        shape = tuple(meta.get("shape", ()))
        scalars, stats_array = stats.from_parts(arrays, dtype, point, list(shape))
    return PendingRecord(meta, _with_stats(meta, meta_json, scalars, False), None, dtype, shape, scalars, stats_array)


def _with_stats(meta: dict, meta_json: str | None, scalars: dict, stored: bool) -> str:
    """The record's metadata as JSON with its stats and `stored`: encoded here (writer=thread), or as
    the server encoded it with them appended. `meta` gets them too."""
    meta["stats"], meta["stored"] = scalars, stored
    if meta_json is None:
        return json.dumps(meta, separators=(",", ":"), allow_nan=True)
    tail = json.dumps(scalars, separators=(",", ":"), allow_nan=True)
    body = meta_json.rstrip()[:-1].rstrip()
    joint = "," if body != "{" else ""
    return f'{body}{joint}"stats":{tail},"stored":{"true" if stored else "false"}}}'


def serve(stdin, stdout) -> int:
    opening = frames.read_frame(stdin)
    if opening is None or opening[0] != frames.OPEN:
        return 2
    o = frames.control_body(opening[2])
    ring = None
    if o.get("ring"):  # the server's shared memory for large arrays (frames.py)
        ring = np.frombuffer(mmap.mmap(o["ring"]["fd"], o["ring"]["bytes"], flags=mmap.MAP_SHARED | getattr(
            mmap, "MAP_POPULATE", 0)), dtype=np.uint8)  # [bytes], its page tables filled once
    recorder = Recorder(o)
    failed = None
    lost = 0
    waiting: list = []  # ids of batches written but not committed yet
    state = {"records": 0, "totals": {}, "committed": (0, 0)}

    def reply(line: str) -> None:
        try:
            stdout.write(line + "\n")
            stdout.flush()
        except (OSError, ValueError):  # the server is gone (SIGKILL): keep writing what arrived
            pass

    def fail(exc: BaseException) -> None:
        nonlocal failed, lost
        failed = exc
        message = one_line(exc)
        committed_now = recorder.written - state["committed"][0]  # parts of a rotating commit that got flushed
        lost += state["records"] - committed_now  # written since the last commit and not committed
        waiting.clear()
        reply(f"E {recorder.written} {recorder.written_bytes} {message}")
        recorder.mark_failure({"capture_error": message, "records_lost": lost, "failed_ns": time.time_ns()})

    def commit() -> None:
        """One flush for every batch written since the last one; acknowledgements are cumulative. With no
        batch waiting, the totals alone are flushed when they changed."""
        if failed is not None:
            return
        if not waiting:
            try:
                recorder.commit(state["totals"])
            except Exception as exc:
                fail(exc)
            return
        try:
            recorder.commit(state["totals"])
        except Exception as exc:
            fail(exc)
            return
        state["committed"], state["records"] = (recorder.written, recorder.written_bytes), 0
        reply(f"A {waiting[-1]}")
        waiting.clear()

    while True:
        frame = frames.read_frame(stdin)
        if frame is None:  # the server is gone: commit what arrived
            break
        kind, count, body = frame
        if kind == frames.BATCH:
            batch_id, totals, records = frames.batch_records(count, body, ring)
            if failed is not None:
                lost += len(records)
                continue
            done = 0
            try:
                for meta_json, full, arrays in records:
                    recorder.write(json.loads(meta_json), meta_json, arrays, full)
                    done += 1
            except Exception as exc:  # disk full, directory gone: report once, keep reading
                lost += len(records) - done
                state["records"] += done
                fail(exc)
                continue
            waiting.append(batch_id)
            state["records"] += done
            state["totals"] = totals
            if state["records"] >= MERGE_RECORDS or not _more_input(stdin):
                commit()  # behind the server: batches already waiting share one flush
        elif kind == frames.FLUSH:
            state["totals"] = frames.control_body(body).get("totals", state["totals"])
            commit()
            reply(f"F {frames.control_body(body)['id']}")
        elif kind == frames.CLOSE:
            if failed is None:
                try:
                    recorder.close(frames.control_body(body).get("totals"))
                except Exception as exc:
                    fail(exc)
            reply("C")
            return 0
    if failed is None:
        recorder.close()
    return 0


MERGE_RECORDS = 64  # at most this many records in one commit when batches queue up


def _more_input(stdin) -> bool:
    """Is another frame already waiting in the pipe? (A frame still in our buffer reads as no: the
    batch is then committed at once, which is never wrong.)"""
    try:
        return bool(select.select([stdin], [], [], 0)[0])
    except (OSError, ValueError, TypeError):
        return False


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server; it closes us
    np.seterr(all="ignore")
    sys.exit(serve(sys.stdin.buffer, sys.stdout))


if __name__ == "__main__":
    main()
