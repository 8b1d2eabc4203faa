"""Getting a tensor off the caller's hands without stalling it.

CPU tensor:  one clone on the caller's thread (later in-place writes cannot change the record).
CUDA tensor: one device-to-device clone on the caller's stream; the copy to pinned host
             memory runs on a side stream, and the writer thread waits on its event.
             The critical stream never waits for the host.
"""

from __future__ import annotations

import threading

import torch


class Staged:
    """Host tensors that become valid once `wait()` returns."""

    __slots__ = ("tensors", "event")

    def __init__(self, tensors: dict[str, torch.Tensor], event=None):
        self.tensors = tensors
        self.event = event

    def wait(self) -> dict[str, torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.tensors

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class Stager:
    """Snapshots tensors: one side stream per CUDA device for the copies to the host."""

    def __init__(self):
        self._streams: dict[int, torch.cuda.Stream] = {}
        self._lock = threading.Lock()

    def stage(self, tensors: dict[str, torch.Tensor]) -> Staged:
        """Snapshot `tensors` (all on one device)."""
        device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
        if device.type != "cuda":
            return Staged({k: t.detach().clone(memory_format=torch.contiguous_format) for k, t in tensors.items()})
        return self._stage_cuda(tensors, device)

    def _stage_cuda(self, tensors, device) -> Staged:
        current = torch.cuda.current_stream(device)
        snaps = {k: t.detach().clone(memory_format=torch.contiguous_format)
                 for k, t in tensors.items()}  # device-to-device, on the caller's stream
        side = self._side_stream(device)
        side.wait_stream(current)
        host = {}
        with torch.cuda.stream(side):
            for key, snap in snaps.items():
                pinned = torch.empty(snap.shape, dtype=snap.dtype, pin_memory=True)
                pinned.copy_(snap, non_blocking=True)
                snap.record_stream(side)  # the snapshot stays alive until the side stream is done with it
                host[key] = pinned
            event = torch.cuda.Event()
            event.record(side)
        return Staged(host, event)

    def _side_stream(self, device: torch.device) -> "torch.cuda.Stream":
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._streams.get(index)
        if stream is None:
            with self._lock:
                stream = self._streams.setdefault(index, torch.cuda.Stream(device=index))
        return stream


def capturing_cuda_graph() -> bool:
    """True inside CUDA-graph capture, where host-side staging would not be replayed."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
