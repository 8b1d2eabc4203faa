"""The lean record path: an enabled CPU point that costs its caller a snapshot and one tuple.

A point whose name is kept, called inside a kept scope without tensor metadata, outside any graph
capture, with point metadata that are scalars seen valid before (and a tap with no flight recorder
and no max_bytes), is snapshotted and queued as a tuple; the writer thread makes its record
(`expand`), with its scope's metadata encoded as JSON once per scope (job.py). Every other call
takes Tap.record.
"""

from __future__ import annotations

import time

import torch

from tensortap.capture.job import RECORD_KEYS, Job, meta_json
from tensortap.capture.staging import Staged
from tensortap.capture.state import CLONE_NUMEL, PER_CALL, SCALARS, check_storable, current_scope

_TENSOR = torch.Tensor
_STRIDED = torch.strided  # sparse and mkldnn tensors take `record`


class LeanRecords:
    """Tap's lean path (a mixin: it uses the Tap's filter caches, stager, counters and writer)."""

    def lean_record(self, info: tuple, name: str, tensor, meta: dict) -> None:
        """A point whose name is kept (`info` from the name cache), called by runtime.point: a CPU tensor
        in a lean scope (ScopeState.lean) whose point metadata are scalars seen valid before costs its
        snapshot and one tuple; the writer side makes the record's metadata from it (`expand`). Every
        other call takes `record`."""
        try:
            state = current_scope.get()
            if state is None or not state.lean or not self.lean_ready or tensor.__class__ is not _TENSOR \
                    or not tensor.is_cpu or tensor.layout is not _STRIDED or tensor.requires_grad \
                    or self.graphs.active:
                return self._record(name, tensor, meta)
            if meta:
                valid = self._valid
                for key, value in meta.items():
                    kind = value.__class__  # lists, dicts, arrays: not hashable, and checked by `record`
                    if kind not in SCALARS or key in PER_CALL or (key, kind, value) not in valid:
                        return self._record(name, tensor, meta)
            # a small tensor: torch's clone (one malloc from the heap, no intra-op threads); a large one into
            # a pooled buffer (no page faults; see Stager.host_copy)
            snap = tensor.clone() if tensor.numel() < CLONE_NUMEL else self.stager.host_copy(tensor)
            self.pend((state, info, name, meta, snap, next(self._seq), time.time_ns(), self.counters.dropped))
        except Exception as exc:  # never into the model's forward
            self.counters.errors += 1
            self._warn_once("error", "tensortap: tap point %r failed (%s: %s); the model keeps running", name,
                            type(exc).__name__, exc)

    def expand(self, lean: tuple) -> Job | None:
        """Writer side: the Job of a lean record (`lean_record`), or None, counted as an error and said
        once, for a tensor the format cannot store or metadata JSON cannot encode (capture goes on)."""
        state, (layer, point, _), name, call, snap, seq, time_ns, dropped = lean
        try:
            check_storable(name, snap)
            base = state.base
            meta = dict(base)
            meta["name"], meta["point"], meta["layer"] = name, point, layer
            if call:
                meta.update(call)
            meta["seq"], meta["time_ns"], meta["dropped_before"] = seq, time_ns, dropped
            base_json = state.base_json
            if base_json is None:  # once per scope, on the writer's side
                base_json = state.base_json = meta_json({k: v for k, v in base.items() if k not in RECORD_KEYS})
            if call and not call.keys().isdisjoint(base):
                base_json = None  # the point overrides its scope's key: its whole metadata is encoded
        except Exception as exc:
            self.counters.errors += 1
            self._warn_once("error", "tensortap: tap point %r failed (%s: %s); the model keeps running", name,
                            type(exc).__name__, exc)
            return None
        pooled = (snap,) if snap.numel() >= CLONE_NUMEL else ()  # host_copy's buffers go back to its pool
        return Job(meta, Staged({"data": snap}, None, pooled), self.full, base_json, tuple(call) if call else ())
