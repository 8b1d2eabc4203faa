"""The one writer thread of a process: a bounded queue in, segments out.

Only this thread calls h5py (h5py holds a global lock). The queue is bounded in bytes:
`on_full=block` makes the caller wait, `on_full=drop` drops the record and counts it.
A write error (disk full, directory gone) is logged once, noted in the dump where
possible, and stops capture; it never reaches the caller.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from tensortap.capture import stats as capture_stats
from tensortap.capture.staging import Staged
from tensortap.format.codecs import encode
from tensortap.format.segment import PendingRecord, SegmentWriter

log = logging.getLogger("tensortap")


@dataclass
class Job:
    """A record on its way to disk."""

    seq: int
    meta: dict  # JSON-able metadata
    staged: Staged  # "data" (the snapshot), "meta:*" (tensor-valued metadata)
    dtype: str
    shape: tuple[int, ...]
    point: str
    full: bool


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


class Writer:
    """Owns the queue, the thread and the SegmentWriter."""

    def __init__(self, segments: SegmentWriter, queue_bytes: int, on_full: str, counters: Counters):
        self.segments = segments
        self.queue_bytes = queue_bytes
        self.block = on_full == "block"
        self.counters = counters
        self.failed: BaseException | None = None
        self._queue: collections.deque = collections.deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="tensortap-writer", daemon=True)
        self._thread.start()

    # -- caller side -------------------------------------------------------------------------
    def submit(self, job: Job) -> bool:
        """Queue a job; False when it was dropped (queue full with on_full=drop, or capture stopped)."""
        size = job.staged.nbytes
        with self._cond:
            while self._queue and self._queued_bytes + size > self.queue_bytes and self.failed is None:
                if not self.block:
                    self.counters.dropped += 1
                    return False
                self._cond.wait()
            if self.failed is not None:
                self.counters.lost += 1
                return False
            self._queue.append(job)
            self._queued_bytes += size
            self._cond.notify_all()
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every job submitted before this call is written and flushed."""
        return self._wait_marker(_Marker(), timeout)

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

    # -- writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                item = self._queue.popleft()
                if isinstance(item, Job):
                    self._queued_bytes -= item.staged.nbytes
                self._cond.notify_all()
            if isinstance(item, _Marker):
                if item.close:
                    self._close_segments()
                    item.done.set()
                    return
                item.done.set()
                continue
            if self.failed is not None:
                self.counters.lost += 1
                continue
            try:
                self.segments.write(self._record(item))
                self.counters.records += 1
                self.counters.bytes += item.staged.tensors["data"].nbytes if item.full else 0
            except Exception as exc:  # disk full, permission, h5py errors: stop, never raise
                self._fail(exc)

    def _record(self, job: Job) -> PendingRecord:
        host = job.staged.wait()
        meta = {key: as_json(value) for key, value in job.meta.items()}
        for key, tensor in host.items():
            if key.startswith("meta:"):
                meta[key[5:]] = tensor.tolist()
        data = host["data"]
        # Full mode stores the tensor (its per-head stats are derivable: Record.stats_array); stats mode stores them.
        stats = capture_stats.device_stats(data, job.point, may_sync=True, zero_counts=not job.full)
        scalars, stats_array = capture_stats.host_stats(stats, job.shape)
        array = encode(data)[0] if job.full else None
        if job.full:
            stats_array = None
        meta["stats"] = scalars
        meta["stored"] = job.full
        return PendingRecord(job.seq, meta, array, job.dtype, job.shape, scalars, stats_array)

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            self.failed = exc
            pending = sum(1 for item in self._queue if isinstance(item, Job))
            self._queue = collections.deque(item for item in self._queue if not isinstance(item, Job))
            self._queued_bytes = 0
            self.counters.lost += 1 + pending
            self._cond.notify_all()
        where = self.segments.open_path or self.segments.directory
        log.error(
            "tensortap: writing %s failed (%s: %s); capture stopped, %d record(s) lost, "
            "the %d record(s) written before stay readable",
            where, type(exc).__name__, exc, self.counters.lost, self.counters.records,
        )
        self.segments.mark_failure(
            {"capture_error": f"{type(exc).__name__}: {exc}", "records_lost": self.counters.lost,
             "failed_ns": time.time_ns()}
        )

    def _close_segments(self) -> None:
        if self.failed is not None:
            return
        try:
            self.segments.close_segment({f"{k}_total": v for k, v in self.counters.as_dict().items()})
        except Exception as exc:
            self._fail(exc)


def as_json(value):
    """Metadata values -> JSON-able Python (numpy scalars, tuples, arrays)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    return str(value)
