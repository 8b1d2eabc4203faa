"""From the queue to the disk: one consumer thread per process, and where it sends records.

The queue is bounded in bytes: `on_full=block` makes the caller wait, `on_full=drop` drops
the record and counts it. The consumer thread takes what is queued a batch at a time (a scope's
records; batches that queued up behind a slow disk are merged), waits for the batch's copy to the
host, and hands the whole batch to a sink, which commits it with one flush:

    ChildSink  (writer=process, the default) sends the batch with one writev to a writer process
               (child.py and sink.py; arrays of 64 KiB or more through a ring of shared memory),
               which computes the stats, alone imports h5py, and answers once the batch is
               committed; this thread holds the GIL for a few microseconds per record, never
               across a write or a copy. Batches stay in memory until committed: if the writer process cannot
               start or dies, this is said once and capture falls back to writer=thread, writing
               again every batch it had not committed: nothing handed over is lost.
    LocalSink  (writer=thread) computes the stats and writes the segment in this thread.

A write error (disk full, directory gone) is logged once, noted in the dump where possible, and
stops capture; it never reaches the caller.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from tensortap.capture import frames
from tensortap.capture.job import Job, Replay, record_count, record_json, yield_gil
from tensortap.capture.child import ChildError, ChildSink, SinkGone, child_sink_env  # noqa: F401  (re-exported)
from tensortap.capture.staging import Stager
from tensortap.format.codecs import encode
from tensortap.text import one_line

log = logging.getLogger("tensortap")

MERGE_BYTES = 64 << 20  # batches queued behind each other are merged into one commit up to this size
MERGE_JOBS = 64  # and records: a commit's dirty metadata stays well inside the metadata cache


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

    FIELDS = frames.TOTALS

    def __init__(self):
        for name in self.FIELDS:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}


def host_arrays(job: Job) -> dict:
    """A job's host arrays once its batch is on the host: "data" as stored (raw bits for bf16/fp8)
    or the "stats:*" parts. Its "meta:*" tensors become lists in job.meta, and the snapshot's dtype
    and shape are written into job.meta (the stored array must match them)."""
    arrays = {}
    for key, tensor in job.staged.tensors.items():
        if key == "data":
            arrays["data"], job.meta["dtype"] = encode(tensor.contiguous())
            job.meta["shape"] = list(tensor.shape)
        elif key.startswith("meta:"):
            job.meta[key[5:]] = tensor.tolist()
        elif isinstance(tensor, np.ndarray):  # a stats part attached as a numpy view (staging.attach)
            arrays[key] = np.ascontiguousarray(tensor)
        else:
            arrays[key] = tensor.contiguous().numpy()
    return arrays


def _nbytes(job) -> int:
    """Bytes a job holds as handed over: a lean record's tuple its snapshot's, a Job or a Replay its staged."""
    return job[4].nbytes if job.__class__ is tuple else job.staged.nbytes


# -- sinks ----------------------------------------------------------------------------------------------
class LocalSink:
    """Stats and h5py in the consumer thread (writer=thread, or after a fallback)."""

    def __init__(self, opening: dict, persisted: int = 0, persisted_bytes: int = 0):
        from tensortap.capture.sink import Recorder  # h5py: only for this writer

        self.opening = opening
        self.recorder = Recorder(opening)
        self._base = (persisted, persisted_bytes)
        self.recycle = _keep  # the Writer sets Stager.recycle: host memory back to the pools

    @property
    def where(self) -> str:
        return self.recorder.where

    @property
    def persisted(self) -> int:
        return self._base[0] + self.recorder.written

    @property
    def persisted_bytes(self) -> int:
        return self._base[1] + self.recorder.written_bytes

    def write_batch(self, jobs: list, arrays: list, totals: dict) -> None:
        for job, held in zip(jobs, arrays):
            self.recorder.write(job.meta, record_json(job) if job.base_json is not None else None, held, job.full)
            yield_gil()
        self.recorder.commit(totals)
        self.recycle([job.staged for job in jobs])  # committed: its memory is not needed any more

    def flush(self, totals: dict) -> None:
        """Every batch was committed as it was written; loss totals counted since then are flushed now."""
        self.recorder.commit(totals)

    def close(self, totals: dict) -> None:
        self.recorder.close(totals)

    def mark_failure(self, attrs: dict) -> None:
        self.recorder.mark_failure(attrs)


def _keep(batch: list) -> None:
    """A sink's `recycle` until the Writer gives it the Stager's: nothing goes back to a pool."""


def make_sink(config, rank: int, identity: dict):
    """Where a writer run's records go: a writer process (outside this GIL), or h5py in the writer thread."""
    opening = dict(dir=config.dir, rank=rank, root_attrs=identity, compress=config.compress,
                   segment_records=config.segment_records, segment_bytes=config.segment_bytes,
                   checksum=bool(getattr(config, "checksum", False)))
    if config.writer == "process":
        return ChildSink(opening)
    return LocalSink(opening)


# -- the consumer thread ----------------------------------------------------------------------------------
class Writer:
    """Owns the bounded queue and the thread that drains it into a sink."""

    def __init__(self, make_sink, stager: Stager, queue_bytes: int, on_full: str, counters: Counters,
                 expand=None, on_failure=None, split=None):
        self.stager = stager
        self.expand = expand  # a lean record (a tuple, Tap.lean_record) -> its Job or None, on this thread
        self.split = split  # a Replay, its copy on the host -> the replay's records (Tap.split_replay)
        self.on_failure = on_failure  # called once when capture stops
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
    def submit(self, jobs: list) -> None:
        """Queue jobs (Jobs, or the tuples of lean records) as one batch (one wake-up, one copy to the
        host); with on_full=drop, what does not fit is dropped and counted."""
        sizes = [_nbytes(job) for job in jobs]
        total = sum(sizes)
        with self._cond:
            if self.failed is None and self._queued_bytes + total <= self.queue_bytes:
                self._queue.append(_Batch(jobs, total))  # the common case: it all fits
                self._queued_bytes += total
                self._cond.notify_all()
                return
            batch, size = [], 0
            for job, need in zip(jobs, sizes):
                while (self._queue or batch) and self._queued_bytes + size + need > self.queue_bytes \
                        and self.failed is None and self.block:
                    if batch:  # let the writer start on what is ready
                        self._queue.append(_Batch(batch, size))
                        self._queued_bytes += size
                        batch, size = [], 0
                    self._cond.notify_all()
                    self._cond.wait()
                if self.failed is not None:
                    self.counters.lost += record_count([job])
                elif (self._queue or batch) and self._queued_bytes + size + need > self.queue_bytes:
                    self.counters.dropped += record_count([job])
                else:
                    batch.append(job)
                    size += need
            if batch:
                self._queue.append(_Batch(batch, size))
                self._queued_bytes += size
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every job submitted before this call is committed; False if capture failed."""
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
            self.sink.recycle = self.stager.recycle
        except Exception as exc:
            self._fail(exc, lost_now=0)
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                item = self._queue.popleft()
                if isinstance(item, _Batch):
                    jobs, size = list(item.jobs), item.nbytes
                    limit = getattr(self.sink, "merge_bytes", MERGE_BYTES)
                    while self._queue and isinstance(self._queue[0], _Batch) and size < limit \
                            and len(jobs) < MERGE_JOBS:
                        more = self._queue.popleft()  # fell behind: one commit for what queued up
                        jobs += more.jobs
                        size += more.nbytes
                    self._queued_bytes -= size
                self._cond.notify_all()
            if isinstance(item, _Marker):
                self._marker(item)
                if item.close:
                    return
                continue
            if self.failed is not None:
                self.counters.lost += record_count(jobs)
                continue
            self._write_batch(jobs)

    def _write_batch(self, jobs: list) -> None:
        try:
            if self.expand is not None:
                jobs = [job for job in (self.expand(j) if j.__class__ is tuple else j for j in jobs) if job is not None]
            self.stager.to_host([job.staged for job in jobs])
            if self.split is not None:  # a replay's drained copy, on the host: its records
                jobs = [out for job in jobs for out in (self.split(job) if job.__class__ is Replay else (job,))]
            yield_gil()
            arrays = []
            for job in jobs:
                arrays.append(host_arrays(job))
                yield_gil()
        except Exception as exc:  # a failed copy to the host: these records are lost
            self._fail(exc, lost_now=record_count(jobs))
            return
        self.counters.records += len(jobs)
        self.counters.bytes += sum(held["data"].nbytes for job, held in zip(jobs, arrays)
                                   if job.full and "data" in held)
        totals = self.counters.as_dict()
        try:
            try:
                self.sink.write_batch(jobs, arrays, totals)
            except SinkGone as gone:
                self._fall_back(gone)
        except Exception as exc:  # disk full, permission: stop, never raise
            self._fail(exc, lost_now=0)

    def _fall_back(self, gone: SinkGone) -> None:
        """The writer process is gone: say so once, write here from now on, and write again every
        batch it had not committed."""
        child = self.sink
        pending = child.unacked()
        again = sum(len(jobs) for jobs, _, _ in pending)
        log.error("tensortap: the writer process %s; writing the dump from this process instead (writer=thread), "
                  "%d record(s) it had not committed are written again", gone, again)
        persisted = self.counters.records - again
        self.sink = LocalSink(child.opening, persisted, max(0, self.counters.bytes - sum(
            held["data"].nbytes for jobs, arrays, _ in pending for job, held in zip(jobs, arrays)
            if job.full and "data" in held)))
        self.sink.recycle = self.stager.recycle
        child.mark_failure({})
        for jobs, arrays, totals in pending:
            self.sink.write_batch(jobs, arrays, totals)

    def _marker(self, marker: _Marker) -> None:
        try:
            if self.failed is None:
                try:
                    self._end(marker)
                except SinkGone as gone:
                    self._fall_back(gone)
                    self._end(marker)
        except Exception as exc:
            self._fail(exc, lost_now=0)
        finally:
            marker.done.set()

    def _end(self, marker: _Marker) -> None:
        if marker.close:
            self.sink.close(self.counters.as_dict())
        else:
            self.sink.flush(self.counters.as_dict())

    def _fail(self, exc: BaseException, lost_now: int) -> None:
        """Stop capture; `lost_now` records in hand are lost with it, and everything queued."""
        persisted = getattr(self.sink, "persisted", None)
        persisted_bytes = getattr(self.sink, "persisted_bytes", None)
        if self.on_failure is not None:
            self.on_failure()
        with self._cond:
            self.failed = exc
            if persisted is not None and persisted < self.counters.records:  # sent, but not written
                self.counters.lost += self.counters.records - persisted
                self.counters.records = persisted
                if persisted_bytes is not None:
                    self.counters.bytes = persisted_bytes
            pending = sum(record_count(item.jobs) for item in self._queue if isinstance(item, _Batch))
            self._queue = collections.deque(item for item in self._queue if not isinstance(item, _Batch))
            self._queued_bytes = 0
            self.counters.lost += lost_now + pending
            self._cond.notify_all()
        where = self.sink.where if self.sink is not None else "the writer"
        message = str(exc) if isinstance(exc, ChildError) else one_line(exc)
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
