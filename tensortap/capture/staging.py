"""Getting a tensor off the caller's hands without stalling it.

CPU tensor:  one copy on the caller's thread (later in-place writes cannot change the record), into a
             host buffer from the snapshot pool: no allocation and no page faults once the pool holds
             buffers of that dtype and shape; a fresh allocation when it holds none.
CUDA tensor: one device-to-device clone on the caller's stream; that is all the caller pays per
             point. When its records are handed over (scope exit), one event per stream marks
             the clones done. The writer thread then orders a side stream after that event,
             packs the batch's snapshots into one buffer, copies it to a pinned host buffer from the
             pinned pool there and waits for it: the critical stream never waits for the host, and
             the caller issues no copy to it.

The pools. Once a batch is written (committed, or acknowledged by the writer process) the writer
gives its host memory back with `recycle(batch)`:

    snapshots  free lists keyed by (dtype, shape), one buffer per CPU record
    pinned     free lists keyed by size class (powers of two, at least 64 KiB); the records of one
               to_host batch share one buffer per device, given back with the last of them

Each pool keeps at most its byte bound (a constructor argument); past it, the keys given back longest
ago are freed first. A record that is never recycled (dropped, lost, a flight-recorder step that falls
out of the ring) frees its buffer like any tensor. Caller threads only take (dict.get and list.pop are
atomic under the GIL: no lock on the caller's path); the writer side gives back under a lock, and
clears a recycled record's tensors first, so no record refers to a buffer that is handed out again.

The writer thread runs its CUDA calls in the relaxed stream-capture mode (as PyTorch's NCCL
watchdog does), so that they cannot invalidate a CUDA-graph capture on the model's thread.
"""

from __future__ import annotations

import collections
import ctypes
import math
import threading

import numpy as np

import torch

from tensortap.capture.job import pace_for_gpu

SNAPSHOT_POOL_BYTES = 256 << 20
PINNED_POOL_BYTES = 256 << 20
MIN_PINNED_BYTES = 64 << 10  # the smallest pinned size class


class Staged:
    """Snapshots of one record: on the host once `Stager.to_host` has run on its batch."""

    __slots__ = ("tensors", "stream", "ready", "pooled", "lease", "on_host", "nbytes")

    def __init__(self, tensors: dict[str, torch.Tensor], stream=None, pooled: tuple = ()):
        self.tensors = tensors
        self.stream = stream  # the caller's CUDA stream the clones were made on; None on the CPU
        self.ready = None  # event after the clones, recorded when the record is handed over
        self.pooled = pooled  # the snapshot pool's buffers it holds (CPU), given back by recycle
        self.lease: PinnedLease | None = None  # the pinned buffer its host tensors are views of (CUDA)
        self.on_host = None  # tensors -> tensors: what to_host does with them once on the host (device stats)
        self.nbytes = 0  # bytes of its tensors as handed over (what the queue and the ring count)
        for tensor in tensors.values():
            self.nbytes += tensor.nbytes

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """More tensors for the record, fresh already (stats partials, scope snapshots): not copied."""
        self.tensors.update(tensors)
        for tensor in tensors.values():
            self.nbytes += tensor.nbytes


class PinnedLease:
    """One pinned host buffer shared by the records of one to_host batch on one device."""

    __slots__ = ("buffer", "size", "holders")

    def __init__(self, buffer: torch.Tensor, size: int, holders: int):
        self.buffer = buffer  # uint8 [size], pinned
        self.size = size  # its size class
        self.holders = holders  # records not recycled yet


class FreeLists:
    """Buffers ready for reuse: one list per key, at most `limit` bytes in all.

    take() runs on caller threads without a lock; give() on the writer side, one thread at a time
    (Stager.recycle holds its lock). `kept` is written by give() alone: a take does not lower it, so it
    bounds the bytes held from above, and a give that would pass the limit first recounts it from the
    lists, then frees the keys given back longest ago until the buffer fits."""

    def __init__(self, limit: int):
        self.limit = limit
        self.kept = 0
        self._lists: collections.OrderedDict = collections.OrderedDict()  # key -> [buffer], least recently given first
        self._sizes: dict = {}  # key -> bytes of one of its buffers

    def take(self, key):
        """A free buffer of `key`, or None."""
        free = self._lists.get(key)
        if free:
            try:
                return free.pop()
            except IndexError:  # another caller thread took the last one
                pass
        return None

    def give(self, key, buffer: torch.Tensor, nbytes: int) -> bool:
        """Keep `buffer` for reuse under `key`; False (it is freed) when it alone passes the limit."""
        if nbytes > self.limit:
            return False
        if self.kept + nbytes > self.limit:
            self.kept = sum(len(free) * self._sizes[k] for k, free in self._lists.items())
            while self.kept + nbytes > self.limit and self._lists:
                oldest, free = self._lists.popitem(last=False)
                self.kept -= len(free) * self._sizes.pop(oldest)
            if not self._lists:  # a caller may have taken from a list between the recount and its eviction
                self.kept = 0
        free = self._lists.get(key)
        if free is None:
            free = self._lists[key] = []
            self._sizes[key] = nbytes
        else:
            self._lists.move_to_end(key)
        free.append(buffer)
        self.kept += nbytes
        return True

    def __len__(self) -> int:
        """Buffers held now."""
        return sum(len(free) for free in self._lists.values())


class Stager:
    """Snapshots on the caller's side; copies to the host on the writer's side (one side stream per
    device); the host buffers come from two bounded pools that `recycle` refills."""

    def __init__(self, snapshot_bytes: int = SNAPSHOT_POOL_BYTES, pinned_bytes: int = PINNED_POOL_BYTES):
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._lock = threading.Lock()
        self._giving = threading.Lock()  # recycle: the writer thread and a reply thread may both give back
        self.snapshots = FreeLists(snapshot_bytes)
        self.pinned = FreeLists(pinned_bytes)
        self.wanted: set = set()  # pinned size classes a caller found none of (pooled_lease)

    def stage(self, tensors: dict[str, torch.Tensor]) -> Staged:
        """Snapshot `tensors` (all on one device) on the caller's thread or stream; on the CPU into
        buffers from the snapshot pool."""
        first = next(iter(tensors.values()), None)
        if first is None:
            return Staged({})
        if first.is_cuda:
            snaps = {k: t.detach().clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}
            return Staged(snaps, torch.cuda.current_stream(first.device))
        if not first.is_cpu:  # another device: ordinary clones (the writer reads them as it can)
            return Staged({k: t.detach().clone() for k, t in tensors.items()})
        snaps = {}
        for key, tensor in tensors.items():
            snaps[key] = self.host_copy(tensor.detach() if tensor.requires_grad else tensor)
        return Staged(snaps, None, tuple(snaps.values()))

    def host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of CPU `tensor` (not requiring grad) in a buffer from the snapshot pool, or in a
        fresh one. A fresh one is never an inference tensor, so that any later caller can write it.

        A contiguous tensor is copied by one memmove on the caller's thread, with the GIL released: not by
        torch's copy, which splits large copies over the intra-op threads. Their workers spin after each
        parallel region, and on a host whose cores are all busy that spinning takes the CPU the writer
        needs (benchmarks/capture.py on 2 cores: 0.31x `tofile` with 2 intra-op threads, 0.61x with 1)."""
        buffer = self.snapshots.take((tensor.dtype, tensor.shape))
        if buffer is None:
            if torch.is_inference_mode_enabled():
                with torch.inference_mode(False):
                    buffer = torch.empty(tensor.shape, dtype=tensor.dtype)  # [*shape]
            else:
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype)  # [*shape]
        if tensor.is_contiguous():
            if tensor.numel():
                ctypes.memmove(buffer.data_ptr(), tensor.data_ptr(), tensor.numel() * tensor.element_size())
            return buffer  # [*shape]
        return buffer.copy_(tensor)  # [*shape], strided: torch's copy

    def recycle(self, batch: list[Staged]) -> None:
        """Writer side, once a batch's host memory is no longer needed: its snapshot buffers and pinned
        buffers go back to the pools. Each record's tensors are cleared first, so that no record can
        reach memory that is handed out again; recycling a record twice does nothing more."""
        with self._giving:
            for staged in batch:
                pooled, lease = staged.pooled, staged.lease
                staged.tensors, staged.pooled, staged.lease = {}, (), None
                for buffer in pooled:
                    self.snapshots.give((buffer.dtype, buffer.shape), buffer, buffer.nbytes)
                if lease is not None:
                    lease.holders -= 1
                    if lease.holders == 0:
                        self.pinned.give(lease.size, lease.buffer, lease.size)

    def pinned_lease(self, nbytes: int, holders: int) -> PinnedLease:
        """A pinned buffer of at least `nbytes` for `holders` records: from the pool, else allocated in
        its size class (the smallest power of two >= nbytes, at least MIN_PINNED_BYTES)."""
        size = size_class(nbytes)
        buffer = self.pinned.take(size)
        if buffer is None:
            buffer = pinned_empty(size)  # [size] uint8
        return PinnedLease(buffer, size, holders)

    def pooled_lease(self, nbytes: int, holders: int) -> PinnedLease | None:
        """A pinned buffer of at least `nbytes` from the pool, or None when it holds none of that size
        class. The caller's thread never allocates pinned memory (it can take milliseconds): it asks the
        writer side to add one of that class to the pool at its next batch (`to_host`)."""
        size = size_class(nbytes)
        buffer = self.pinned.take(size)
        if buffer is None:
            self.wanted.add(size)
            return None
        return PinnedLease(buffer, size, holders)

    @staticmethod
    def mark_ready(batch: list[Staged]) -> None:
        """Caller side, when records are handed over: one event per stream, after every clone made on it."""
        events: dict = {}
        for staged in batch:
            if staged.stream is not None and staged.ready is None:
                event = events.get(staged.stream)
                if event is None:
                    event = events[staged.stream] = torch.cuda.Event()
                    event.record(staged.stream)
                staged.ready = event

    def to_host(self, batch: list[Staged]) -> None:
        """Writer side: the snapshots of many records to pinned host memory, one copy per device; then
        each record's `on_host` (device stats: the parts from their partials) runs on its host tensors."""
        while self.wanted:
            size = self.wanted.pop()
            with self._giving:
                self.pinned.give(size, pinned_empty(size), size)
        by_device: dict[torch.device, list[Staged]] = {}
        for staged in batch:
            if staged.stream is not None:
                by_device.setdefault(next(iter(staged.tensors.values())).device, []).append(staged)
        if by_device:
            pace_for_gpu()
            self._copy_to_host(by_device)
        for staged in batch:
            if staged.on_host is not None:
                staged.tensors, staged.on_host = staged.on_host(staged.tensors), None

    def _copy_to_host(self, by_device: dict) -> None:
        """On a side stream per device, ordered after the records' ready events: the byte views of every
        snapshot are packed into one buffer (one kernel), copied into one pooled pinned buffer, and waited
        for; each record then gets views into it (and a share of its lease)."""
        relax_capture_mode()
        waits = []
        for device, records in by_device.items():
            side = self._side_stream(device)
            for event in {id(r.ready): r.ready for r in records}.values():
                side.wait_event(event)
            snaps = [snap for r in records for snap in r.tensors.values()]
            with torch.cuda.stream(side):
                # every snapshot starts 16-byte aligned: views of any dtype work on the host
                packed = torch.cat(aligned_pieces([snap.reshape(-1).view(torch.uint8) for snap in snaps]))  # [bytes]
                lease = self.pinned_lease(packed.numel(), len(records))
                lease.buffer[:packed.numel()].copy_(packed, non_blocking=True)  # [bytes]
                # no record_stream per snapshot (several us each): `snaps` holds them until `done` below
                done = torch.cuda.Event(blocking=True)  # the writer sleeps in synchronize(), not spins
                done.record(side)
            waits.append((done, records, lease))
        for done, records, lease in waits:
            done.synchronize()
            attach(records, lease)

    def _side_stream(self, device: torch.device) -> "torch.cuda.Stream":
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            with self._lock:
                stream = self._streams.setdefault(index, own_stream(index))
        return stream


def attach(records: list[Staged], lease: PinnedLease) -> None:
    """Each record's snapshots become views into the lease's buffer, where to_host packed them in order
    (each starting ALIGN-aligned); every record holds a share of the lease."""
    offset = 0
    flat = lease.buffer.numpy()  # [size] uint8, the same memory
    for r in records:
        host = {}
        for key, snap in r.tensors.items():
            n = snap.numel() * snap.element_size()
            host[key] = host_view(key, snap.dtype, snap.shape, lease.buffer, flat, offset)
            offset += n + (-n % ALIGN)
        r.tensors, r.stream, r.ready, r.lease = host, None, None, lease


def host_view(key: str, dtype: torch.dtype, shape, buffer: torch.Tensor, flat: np.ndarray, offset: int):
    """The tensor `key` of `dtype` and `shape` at byte `offset` of a host buffer, given as torch (`buffer`)
    and as numpy (`flat`, the same memory). "data" stays a torch tensor (its dtype may be one numpy
    lacks); the small stats parts and "meta:" tensors are numpy views, a fraction of a microsecond each
    where a torch view costs several of the writer's GIL."""
    n = math.prod(shape) * dtype.itemsize
    as_numpy = NUMPY_DTYPES.get(dtype) if key != "data" else None
    if as_numpy is not None:
        return flat[offset:offset + n].view(as_numpy).reshape(shape)  # [*shape]
    return buffer[offset:offset + n].view(dtype).view(shape)  # [*shape]


NUMPY_DTYPES = {torch.bool: np.bool_, torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16,
                torch.int32: np.int32, torch.int64: np.int64, torch.float16: np.float16,
                torch.float32: np.float32, torch.float64: np.float64}


def aligned_pieces(raws: list) -> list:
    """Flat uint8 tensors, each followed by the pad that makes the next start ALIGN-aligned: what one
    torch.cat packs into a buffer where each starts at its aligned offset."""
    pieces = []
    for raw in raws:
        pieces.append(raw)
        if raw.numel() % ALIGN:
            pieces.append(torch.empty(-raw.numel() % ALIGN, dtype=torch.uint8, device=raw.device))  # [pad]
    return pieces


def size_class(nbytes: int) -> int:
    """The pinned pool's size class for `nbytes`: the smallest power of two >= nbytes, at least
    MIN_PINNED_BYTES."""
    return max(MIN_PINNED_BYTES, 1 << max(0, nbytes - 1).bit_length())


def pinned_empty(nbytes: int) -> torch.Tensor:
    """Page-locked host memory: uint8 [nbytes]."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def capturing_cuda_graph() -> bool:
    """True inside CUDA-graph capture, where host-side staging would not be replayed."""
    return torch.cuda.is_current_stream_capturing()


ALIGN = 16  # bytes: where each snapshot starts in a packed batch
_relaxed = threading.local()
_CAPTURE_MODE_RELAXED = 2  # cudaStreamCaptureModeRelaxed


def relax_capture_mode() -> None:
    """Let this thread's CUDA calls (event waits, pinned allocations) coexist with a CUDA-graph
    capture in progress on another thread: cudaThreadExchangeStreamCaptureMode(Relaxed), once."""
    if getattr(_relaxed, "done", False):
        return
    _relaxed.done = True
    function = _cudart_symbol("cudaThreadExchangeStreamCaptureMode")
    if function is not None:
        function(ctypes.byref(ctypes.c_int(_CAPTURE_MODE_RELAXED)))


def own_stream(device) -> "torch.cuda.Stream":
    """A CUDA stream of the tap's own on `device`, not one of torch's pooled streams: torch hands out 32
    per device round-robin, so a pooled stream can be the very one a model captures a graph on (torch's
    default capture stream is pooled too), and the tap's work on it would join that capture. Falls back
    to a pooled stream where the runtime function cannot be found."""
    index = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    create = _cudart_symbol("cudaStreamCreateWithFlags")
    if create is None:
        return torch.cuda.Stream(device=index)
    with torch.cuda.device(index):
        handle = ctypes.c_void_p()
        if create(ctypes.byref(handle), 1) != 0:  # cudaStreamNonBlocking
            return torch.cuda.Stream(device=index)
    return torch.cuda.ExternalStream(handle.value, device=index)


def _cudart_symbol(name: str):
    """A CUDA runtime function from the libcudart this process loaded (torch's), or None."""
    candidates = [None]
    try:
        with open("/proc/self/maps") as maps:
            candidates += sorted({line.split()[-1] for line in maps if "libcudart" in line})
    except OSError:
        pass
    for path in candidates:
        try:
            return getattr(ctypes.CDLL(path), name)
        except (OSError, AttributeError):
            continue
    return None
