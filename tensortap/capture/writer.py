"""From the queue to the disk: one consumer thread per process, and where it sends records.

The queue is bounded in bytes: `on_full=block` makes the caller wait, `on_full=drop` drops
the record and counts it. The consumer thread waits for each snapshot's copy to the host and
hands the record to a sink:

    ChildSink  (writer=process, the default) streams it to a writer process (sink.py), which
               computes the stats and alone calls h5py, outside this process's GIL;
    LocalSink  (writer=thread) computes the stats and writes the segment in this thread.

A write error (disk full, directory gone, writer process dead) is logged once, noted in the
dump where possible, and stops capture; it never reaches the caller.
"""

from __future__ import annotations

import collections
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from tensortap.capture.frames import build_record, write_frame
from tensortap.capture.staging import Staged, Stager
from tensortap.format.codecs import encode
from tensortap.format.segment import SegmentWriter
from tensortap.text import as_json

log = logging.getLogger("tensortap")


@dataclass
class Job:
    """A record on its way to disk."""

    meta: dict  # metadata (seq, point, dtype, ...); tensor values travel in `staged` as "meta:<key>"
    staged: Staged  # "data" (the snapshot) and "meta:*"
    full: bool  # the tensor is stored, not only its stats


@dataclass
class _Batch:
    """Jobs handed over together (a scope's records): one copy to the host for all of them."""

    jobs: list
    nbytes: int


class _Marker:
    """Placed in the queue by flush()/close(): set when everything before it is on disk."""

    def __init__(self, close: bool = False):
        self.done = threading.Event()
        self.close = close


class Counters:
    """What happened to the records a process offered: written, dropped, skipped, lost."""

    FIELDS = ("records", "bytes", "dropped", "over_budget", "lost", "errors", "graph_skipped")

    def __init__(self):
        for name in self.FIELDS:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}


# -- sinks ----------------------------------------------------------------------------------------------
class LocalSink:
    """Stats and h5py in the consumer thread (writer=thread)."""

    def __init__(self, segments: SegmentWriter):
        self.segments = segments

    @property
    def where(self) -> str:
        return self.segments.open_path or self.segments.directory

    def write(self, seq: int, meta: dict, array: np.ndarray, dtype: str, point: str, full: bool) -> None:
        self.segments.write(build_record(seq, meta, array, dtype, point, full))

    def flush(self) -> None:
        """Nothing left to do: SegmentWriter flushes the file after every record it writes."""

    def close(self, attrs: dict) -> None:
        self.segments.close_segment(attrs)

    def mark_failure(self, attrs: dict) -> None:
        self.segments.mark_failure(attrs)


class ChildSink:
    """Frames to a writer process (writer=process); its replies are read by a small thread."""

    PIPE_BYTES = 1 << 20

    def __init__(self, opening: dict, timeout: float = 120.0):
        self.where = opening["dir"]
        self.timeout = timeout
        self.error: str | None = None
        self.persisted: int | None = None  # records the writer process had written when it failed
        self._flushed = threading.Condition()
        self._flush_id = self._acked = 0
        self._closed = threading.Event()  # it answered the close
        self._gone = threading.Event()  # its output ended: it exited
        self.process = subprocess.Popen(self._command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        close_fds=True, **self._popen_options())
        self._fd = self.process.stdin.fileno()
        _grow_pipe(self._fd, self.PIPE_BYTES)
        threading.Thread(target=self._read_replies, name="tensortap-sink-replies", daemon=True).start()
        write_frame(self._fd, dict(opening, k="open"))

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "tensortap.capture.sink"]

    def _popen_options(self) -> dict:
        return {"env": child_sink_env()}

    def _read_replies(self) -> None:
        for line in self.process.stdout:
            text = line.decode("utf-8", errors="replace").rstrip("\n")
            if text.startswith("F "):
                with self._flushed:
                    self._acked = int(text[2:])
                    self._flushed.notify_all()
            elif text.startswith("E "):
                count, _, message = text[2:].partition(" ")
                self.persisted, self.error = int(count), message
            elif text == "C":
                self._closed.set()
        self._gone.set()
        with self._flushed:
            self._flushed.notify_all()

    def _check(self) -> None:
        if self.error is not None:
            raise OSError(self.error)
        if (self._gone.is_set() or self.process.poll() is not None) and not self._closed.is_set():
            raise OSError(f"the writer process exited (code {self.process.poll()})")

    def write(self, seq: int, meta: dict, array: np.ndarray, dtype: str, point: str, full: bool) -> None:
        self._check()
        header = dict(k="rec", seq=seq, meta=meta, dtype=dtype, shape=list(array.shape), point=point, full=full)
        try:
            write_frame(self._fd, header, array)
        except OSError as exc:  # broken pipe: the writer process died
            raise OSError(self.error or f"the writer process is gone ({exc})") from None

    def flush(self) -> None:
        """Returns once the writer process has written and flushed everything sent so far."""
        self._flush_id += 1
        write_frame(self._fd, dict(k="flush", id=self._flush_id))
        deadline = time.monotonic() + self.timeout
        with self._flushed:
            while self._acked < self._flush_id and not self._gone.is_set():
                if not self._flushed.wait(max(0.0, deadline - time.monotonic())):
                    raise OSError(f"the writer process did not flush within {self.timeout:.0f} s")
        self._check()
        if self._acked < self._flush_id:
            raise OSError("the writer process exited before it flushed")

    def close(self, attrs: dict) -> None:
        try:
            write_frame(self._fd, dict(k="close", attrs=attrs))
            self._gone.wait(self.timeout)  # it answers "C", then exits; or it died
        finally:
            self._shut()
        self._check()

    def mark_failure(self, attrs: dict) -> None:
        self._shut()  # the writer process noted the loss itself when it could

    def _shut(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _grow_pipe(fd: int, size: int) -> None:
    """A bigger pipe (Linux): fewer wake-ups of the writer process per record."""
    try:
        import fcntl

        fcntl.fcntl(fd, 1031, size)  # F_SETPIPE_SZ
    except (ImportError, OSError):
        pass


# -- the consumer thread ----------------------------------------------------------------------------------
class Writer:
    """Owns the bounded queue and the thread that drains it into a sink."""

    def __init__(self, make_sink, stager: Stager, queue_bytes: int, on_full: str, counters: Counters):
        self.stager = stager
        self.queue_bytes = queue_bytes
        self.block = on_full == "block"
        self.counters = counters
        self.failed: BaseException | None = None
        self.sink = None
        self._make_sink = make_sink
        self._queue: collections.deque = collections.deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="tensortap-writer", daemon=True)
        self._thread.start()

    # -- caller side -------------------------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs as one batch (one wake-up, one copy to the host); with on_full=drop, what does not
        fit is dropped and counted."""
        with self._cond:
            batch, size = [], 0
            for job in jobs:
                need = job.staged.nbytes
                while (self._queue or batch) and self._queued_bytes + size + need > self.queue_bytes \
                        and self.failed is None and self.block:
                    if batch:  # let the writer start on what is ready
                        self._queue.append(_Batch(batch, size))
                        self._queued_bytes += size
                        batch, size = [], 0
                    self._cond.notify_all()
                    self._cond.wait()
                if self.failed is not None:
                    self.counters.lost += 1
                elif (self._queue or batch) and self._queued_bytes + size + need > self.queue_bytes:
                    self.counters.dropped += 1
                else:
                    batch.append(job)
                    size += need
            if batch:
                self._queue.append(_Batch(batch, size))
                self._queued_bytes += size
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every job submitted before this call is written and flushed; False if capture failed."""
        return self._wait_marker(_Marker(), timeout) and self.failed is None

    def close(self, timeout: float | None = None) -> None:
        self._wait_marker(_Marker(close=True), timeout)
        self._thread.join(timeout)

    def _wait_marker(self, marker: _Marker, timeout: float | None) -> bool:
        if not self._thread.is_alive():
            return True
        with self._cond:
            self._queue.append(marker)
            self._cond.notify_all()
        return marker.done.wait(timeout)

    # -- writer thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.sink = self._make_sink()
        except Exception as exc:
            self._fail(exc, lost_now=0)
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                item = self._queue.popleft()
                if isinstance(item, _Batch):
                    self._queued_bytes -= item.nbytes
                self._cond.notify_all()
            if isinstance(item, _Marker):
                self._marker(item)
                if item.close:
                    return
                continue
            if self.failed is not None:
                self.counters.lost += len(item.jobs)
                continue
            self._write_batch(item.jobs)

    def _write_batch(self, jobs: list[Job]) -> None:
        written = 0
        try:
            self.stager.to_host([job.staged for job in jobs])
            for job in jobs:
                host = job.staged.tensors
                data = host["data"]
                self.sink.write(job.meta["seq"], _finish_meta(job, host), encode(data)[0], job.meta["dtype"],
                                job.meta["point"], job.full)
                written += 1
                self.counters.records += 1
                self.counters.bytes += data.nbytes if job.full else 0
        except Exception as exc:  # disk full, permission, writer process gone: stop, never raise
            self._fail(exc, lost_now=len(jobs) - written)

    def _marker(self, marker: _Marker) -> None:
        try:
            if self.failed is None:
                if marker.close:
                    self.sink.close({f"{k}_total": v for k, v in self.counters.as_dict().items()})
                else:
                    self.sink.flush()
        except Exception as exc:
            self._fail(exc, lost_now=0)
        finally:
            marker.done.set()

    def _fail(self, exc: BaseException, lost_now: int) -> None:
        """Stop capture; `lost_now` records in hand are lost with it, and everything queued."""
        persisted = getattr(self.sink, "persisted", None)
        with self._cond:
            self.failed = exc
            if persisted is not None and persisted < self.counters.records:  # sent, but not written
                self.counters.lost += self.counters.records - persisted
                self.counters.records = persisted
            pending = sum(len(item.jobs) for item in self._queue if isinstance(item, _Batch))
            self._queue = collections.deque(item for item in self._queue if not isinstance(item, _Batch))
            self._queued_bytes = 0
            self.counters.lost += lost_now + pending
            self._cond.notify_all()
        where = self.sink.where if self.sink is not None else "the writer"
        message = " ".join(f"{type(exc).__name__}: {exc}".split())
        log.error(
            "tensortap: writing %s failed (%s); capture stopped, %d record(s) lost, "
            "the %d record(s) written before stay readable",
            where, message, self.counters.lost, self.counters.records,
        )
        if self.sink is not None:
            try:
                self.sink.mark_failure({"capture_error": message,
                                        "records_lost": self.counters.lost, "failed_ns": time.time_ns()})
            except Exception:
                pass


def _finish_meta(job: Job, host: dict) -> dict:
    """JSON-able metadata: tensor-valued entries (now on the host) become lists."""
    meta = {key: as_json(value) for key, value in job.meta.items()}
    for key, tensor in host.items():
        if key.startswith("meta:"):
            meta[key[5:]] = tensor.tolist()
    return meta


def child_sink_env() -> dict:
    """The writer process needs this package importable exactly as the server imports it."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("TAP", None)
    return env
