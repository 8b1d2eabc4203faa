"""Getting a tensor off the caller's hands without stalling it.

CPU tensor:  one clone on the caller's thread (later in-place writes cannot change the record).
CUDA tensor: one device-to-device clone on the caller's stream; that is all the caller pays per
             point. When its records are handed over (scope exit), one event per stream marks
             the clones done. The writer thread then orders a side stream after that event,
             packs the batch's snapshots into one buffer, copies it to pinned host memory there
             and waits for it: the critical stream never waits for the host, and the caller
             issues no copy to it.

The writer thread runs its CUDA calls in the relaxed stream-capture mode (as PyTorch's NCCL
watchdog does), so that they cannot invalidate a CUDA-graph capture on the model's thread.
"""

from __future__ import annotations

import ctypes
import threading

import torch


class Staged:
    """Snapshots of one record: on the host once `Stager.to_host` has run on its batch."""

    __slots__ = ("tensors", "stream", "ready")

    def __init__(self, tensors: dict[str, torch.Tensor], stream=None):
        self.tensors = tensors
        self.stream = stream  # the caller's CUDA stream the clones were made on; None on the CPU
        self.ready = None  # event after the clones, recorded when the record is handed over

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class Stager:
    """Snapshots on the caller's side; copies to the host on the writer's side (one side stream per device)."""

    def __init__(self):
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def stage(self, tensors: dict[str, torch.Tensor]) -> Staged:
        """Snapshot `tensors` (all on one device) on the caller's thread or stream."""
        first = next(iter(tensors.values()), None)
        if first is None or not first.is_cuda:  # the writer makes it contiguous when it encodes it
            return Staged({k: (t.detach() if t.requires_grad else t).clone() for k, t in tensors.items()})
        snaps = {k: t.detach().clone(memory_format=torch.contiguous_format) for k, t in tensors.items()}
        return Staged(snaps, torch.cuda.current_stream(first.device))

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
        """Writer side: the snapshots of many records to pinned host memory, one copy per device.

        On a side stream ordered after the records' ready events: the byte views of every snapshot
        are packed into one buffer (one kernel), copied to one pinned buffer, and waited for; each
        record then gets views into it."""
        by_device: dict[torch.device, list[Staged]] = {}
        for staged in batch:
            if staged.stream is not None:
                by_device.setdefault(next(iter(staged.tensors.values())).device, []).append(staged)
        if not by_device:
            return
        relax_capture_mode()
        waits = []
        for device, records in by_device.items():
            side = self._side_stream(device)
            for event in {id(r.ready): r.ready for r in records}.values():
                side.wait_event(event)
            snaps = [snap for r in records for snap in r.tensors.values()]
            with torch.cuda.stream(side):
                pieces = []
                for snap in snaps:  # every snapshot starts 16-byte aligned: views of any dtype work on the host
                    raw = snap.reshape(-1).view(torch.uint8)  # [n]
                    pieces.append(raw)
                    if raw.numel() % ALIGN:
                        pieces.append(torch.empty(-raw.numel() % ALIGN, dtype=torch.uint8, device=raw.device))
                packed = torch.cat(pieces)  # [bytes], one kernel
                pinned = torch.empty(packed.numel(), dtype=torch.uint8, pin_memory=True)
                pinned.copy_(packed, non_blocking=True)
                for snap in snaps:
                    snap.record_stream(side)  # made on the caller's stream, read on this one
                done = torch.cuda.Event()
                done.record(side)
            waits.append((done, records, pinned))
        for done, records, pinned in waits:
            done.synchronize()
            offset = 0
            for r in records:
                host = {}
                for key, snap in r.tensors.items():
                    n = snap.numel() * snap.element_size()
                    host[key] = pinned[offset:offset + n].view(snap.dtype).view(snap.shape)
                    offset += n + (-n % ALIGN)
                r.tensors, r.stream, r.ready = host, None, None

    def _side_stream(self, device: torch.device) -> "torch.cuda.Stream":
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            with self._lock:
                stream = self._streams.setdefault(index, torch.cuda.Stream(device=index))
        return stream


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
