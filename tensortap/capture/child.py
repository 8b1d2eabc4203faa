"""The writer process's side of the server: `ChildSink` and the shared ring (writer=process).

`ChildSink` starts `python -m tensortap.capture.sink`, sends it each batch with one writev (arrays
of 64 KiB or more through `_Ring`, a memfd both processes map), and reads its one-line replies
in a small thread (frames.py lists them). It keeps every batch until the writer process says it
is committed, so that the writer thread can write them again itself if the process dies: a record
copied wholly into the ring is kept as that copy (its span is reused only once acknowledged), and its
snapshot goes back to the pool at once.
"""

from __future__ import annotations

import collections
import mmap
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np

from tensortap.capture import frames
from tensortap.capture.job import record_json, yield_gil
from tensortap.text import one_line


class SinkGone(OSError):
    """The writer process exited (or never started) without reporting a write error."""


class ChildError(OSError):
    """The write error the writer process reported (its message already says what it was)."""


class _Ring:
    """Shared memory (a memfd) for large arrays on their way to the writer process: allocated in
    order, each batch's span reused once the writer process has acknowledged the batch."""

    ALIGN = 64

    def __init__(self, size: int, sink: "ChildSink"):
        self.fd = os.memfd_create("tensortap-ring", getattr(os, "MFD_CLOEXEC", 0))
        os.ftruncate(self.fd, size)
        # its pages faulted in now, once: a copy into shared memory not touched yet ran at ~0.8 GB/s,
        # ~9 GB/s after. This commits the ring's RING_BYTES when the writer process starts (records
        # under RING_MIN, as in stats mode, never use the ring; that memory is the price of the speed)
        self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        self.buffer = np.frombuffer(self.map, dtype=np.uint8)  # [size]
        self.size = size
        self.sink = sink
        self.head = 0
        self.spans: collections.deque = collections.deque()  # [batch id, start, end] of unacknowledged batches
        self.current: list | None = None

    def begin(self, batch_id: int) -> None:
        self.current = [batch_id, None, None]

    def end(self) -> None:
        if self.current is not None and self.current[1] is not None:
            self.spans.append(self.current)
        self.current = None

    def put(self, array: np.ndarray) -> int | None:
        """Copy `array` into the ring; its offset, or None (send it inline) when it cannot fit."""
        need = array.nbytes + (-array.nbytes % self.ALIGN)
        while True:
            acked = self.sink._acked
            while self.spans and self.spans[0][0] <= acked:
                self.spans.popleft()
            at = self._fit(need)
            if at is not None:
                break
            if self.sink.error is not None:  # it reported a write error: it will acknowledge nothing more
                raise OSError(self.sink.error)
            if not self.spans or self.sink._gone.is_set():  # no older batch to wait for
                return None
            with self.sink._acks:
                if self.sink._acked == acked and not self.sink._gone.is_set():
                    self.sink._acks.wait(1.0)
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # [n]
        self.buffer[at:at + flat.size] = flat
        if self.current[1] is None:
            self.current[1] = at
        self.current[2] = self.head = at + need
        return at

    def view(self, at: int, array: np.ndarray) -> np.ndarray:
        """The copy of `array` that put() made at `at` (it stays until its batch is acknowledged: what a
        fallback writes again if the writer process dies first)."""
        return self.buffer[at:at + array.nbytes].view(array.dtype).reshape(array.shape)  # [*shape]

    def holds(self, array: np.ndarray) -> bool:
        return array.base is self.buffer  # numpy keeps the array that owns the view as its base

    def _fit(self, need: int) -> int | None:
        used = list(self.spans) + ([self.current] if self.current[1] is not None else [])
        if not used:
            self.head = 0
            return 0 if need <= self.size else None
        tail, head = used[0][1], self.head
        if tail < head:
            if head + need <= self.size:
                return head
            return 0 if need <= tail else None  # wrap; the gap at the end goes with this batch
        if tail > head and head + need <= tail:
            return head
        return None


_REPLY = re.compile(r"([AFEC])(?: (\d+))?(?: (\d+) ?(.*))?")


class ChildSink:
    """Batches to a writer process (writer=process); its replies are read by a small thread."""

    PIPE_BYTES = 1 << 20
    RING_BYTES = 64 << 20

    @property
    def merge_bytes(self) -> int:
        """How much the writer thread merges into one batch when it fell behind: a quarter of the ring,
        so that several batches are in flight. A batch filling the whole ring would make this thread
        wait for the writer process to commit all of it before it could copy the next one in (the two
        processes taking turns); the writer process merges what queued up in its pipe into one commit
        anyway."""
        return self._ring.size // 4 if self._ring is not None else 16 << 20

    def __init__(self, opening: dict, timeout: float = 120.0):
        self.opening = opening
        self.where = opening["dir"]
        self.timeout = timeout
        self.error: str | None = None  # the write error it reported ("E")
        self.persisted: int | None = None  # records it had written when it reported one
        self.persisted_bytes: int | None = None
        self._notes: collections.deque = collections.deque(maxlen=8)  # its other output (a traceback)
        self._unacked: collections.deque = collections.deque()  # (batch id, jobs, arrays, totals)
        self._batch_id = 0
        self._acked = 0  # last batch id it committed
        self._acks = threading.Condition()
        self._ring: _Ring | None = None
        self._flushed = threading.Condition()
        self._flush_id = self._flush_acked = 0
        self._closed = threading.Event()  # it answered the close
        self._gone = threading.Event()  # its output ended: it exited
        self._fd = -1
        self.recycle = lambda batch: None  # the Writer sets Stager.recycle: host memory back to the pools
        try:
            self._ring = _Ring(self.RING_BYTES, self) if hasattr(os, "memfd_create") else None
        except OSError:
            self._ring = None  # no shared memory: every array travels in the pipe
        if self._ring is not None:
            opening = dict(opening, ring={"fd": self._ring.fd, "bytes": self._ring.size})
        options = self._popen_options()
        if self._ring is not None:
            options["pass_fds"] = tuple(options.get("pass_fds", ())) + (self._ring.fd,)
        try:
            self.process = subprocess.Popen(self._command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, close_fds=True, **options)
        except (OSError, ValueError) as exc:
            self.process = None
            self._notes.append(f"could not be started ({one_line(exc)})")
            self._gone.set()
            return
        self._fd = self.process.stdin.fileno()
        _grow_pipe(self._fd, self.PIPE_BYTES)
        threading.Thread(target=self._read_replies, name="tensortap-sink-replies", daemon=True).start()
        try:
            frames.write_all(self._fd, [frames.control_frame(frames.OPEN, opening)])
        except OSError as exc:  # it died already: its exit is reported with the first batch
            self._notes.append(f"exited before it was opened ({one_line(exc)})")

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "tensortap.capture.sink"]

    def _popen_options(self) -> dict:
        return {"env": child_sink_env()}

    def _read_replies(self) -> None:
        for line in self.process.stdout:
            text = line.decode("utf-8", errors="replace").rstrip("\n")
            match = _REPLY.fullmatch(text)
            if match is None:
                if text.strip():
                    self._notes.append(text.strip())
                continue
            kind, number = match.group(1), match.group(2)
            if kind == "A":
                with self._acks:
                    self._acked = int(number)
                    self._acks.notify_all()
            elif kind == "F":
                with self._flushed:
                    self._flush_acked = int(number)
                    self._flushed.notify_all()
            elif kind == "E":
                self.persisted, self.persisted_bytes = int(number), int(match.group(3) or 0)
                self.error = match.group(4) or "write error"
            elif kind == "C":
                self._closed.set()
        self._gone.set()
        with self._flushed:
            self._flushed.notify_all()
        with self._acks:
            self._acks.notify_all()

    # -- what the writer thread calls ---------------------------------------------------------------------
    def write_batch(self, jobs: list, arrays: list, totals: dict) -> None:
        self._prune()
        self._batch_id += 1
        self._unacked.append((self._batch_id, jobs, arrays, totals))  # until it says the batch is committed
        self._check()
        records = []
        for job, held in zip(jobs, arrays):
            records.append((record_json(job).encode(), job.full, held))
            yield_gil()  # the model's thread may take the GIL between records
        if self._ring is not None:
            self._ring.begin(self._batch_id)
        try:
            pieces = frames.batch_pieces(self._batch_id, totals, records, self._ring)
        finally:
            if self._ring is not None:
                self._ring.end()
        if self._ring is not None:  # records now wholly in the ring: their snapshots back to the pool now
            self.recycle([job.staged for job, held in zip(jobs, arrays)
                          if held and all(self._ring.holds(array) for array in held.values())])
        try:
            frames.write_all(self._fd, pieces)
        except OSError:  # broken pipe: it died
            self._raise_gone()

    def flush(self, totals: dict) -> None:
        """Returns once the writer process has committed everything sent so far, and `totals` (the loss
        totals now: some may have grown since the last batch)."""
        self._check()
        self._flush_id += 1
        try:
            frames.write_all(self._fd, [frames.control_frame(frames.FLUSH, {"id": self._flush_id, "totals": totals})])
        except OSError:
            self._raise_gone()
        deadline = time.monotonic() + self.timeout
        with self._flushed:
            while self._flush_acked < self._flush_id and not self._gone.is_set():
                if not self._flushed.wait(max(0.0, deadline - time.monotonic())):
                    raise OSError(f"the writer process did not flush within {self.timeout:.0f} s")
        if self._flush_acked < self._flush_id:
            self._raise_gone()
        self._check()  # an "E" it sent comes before the "F"
        self._prune()

    def close(self, totals: dict) -> None:
        self._check()
        try:
            frames.write_all(self._fd, [frames.control_frame(frames.CLOSE, {"totals": totals})])
        except OSError:
            self._raise_gone()
        self._gone.wait(self.timeout)  # it answers "C", then exits; or it died
        if self.error is None and not self._closed.is_set():
            self._raise_gone()
        self._shut()
        if self.error is not None:
            raise ChildError(self.error)

    def mark_failure(self, attrs: dict) -> None:
        self._shut()  # the writer process noted the loss itself when it could

    def unacked(self) -> list[tuple[list, list, dict]]:
        """Batches sent but not committed, in order: what a fallback writes again."""
        self._prune()
        return [(jobs, arrays, totals) for _, jobs, arrays, totals in self._unacked]

    def death(self) -> str:
        """Why it is gone, in words (its exit code and the last thing it printed)."""
        code = self.process.poll() if self.process is not None else None
        said = self._notes[-1] if self._notes else ""
        how = f"exited with code {code}" if code is not None else "is gone"
        if self.process is None:
            how = said
            said = ""
        return how + (f" ({said})" if said else "")

    # -- helpers -------------------------------------------------------------------------------------------
    def _prune(self) -> None:
        """Forget the batches the writer process committed; their host memory goes back to the pools."""
        acked = self._acked
        while self._unacked and self._unacked[0][0] <= acked:
            _, jobs, _, _ = self._unacked.popleft()
            self.recycle([job.staged for job in jobs])

    def _check(self) -> None:
        if self.error is not None:
            raise ChildError(self.error)
        if self._gone.is_set() and not self._closed.is_set():
            self._raise_gone()

    def _raise_gone(self) -> None:
        self._gone.wait(5.0)  # its last words ("E ...") are read before its output ends
        if self.error is not None:
            raise ChildError(self.error)
        if self.process is not None:
            try:
                self.process.wait(5.0)
            except subprocess.TimeoutExpired:
                pass
        raise SinkGone(self.death())

    def _shut(self) -> None:
        if self._ring is not None:
            try:
                os.close(self._ring.fd)
            except OSError:
                pass
            self._ring = None  # its memory goes with the mapping
        if self.process is None:
            return
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


def child_sink_env() -> dict:
    """The writer process needs this package importable exactly as the server imports it."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("TAP", None)
    return env
