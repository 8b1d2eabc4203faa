"""Records of points inside CUDA graphs: slots at capture, records after each replay (graphs.py).

After a replay the model's thread makes one copy of the graph's slots, applies the filter per slot
and queues one Replay (job.py); the writer side cuts the records out of the copy once it is on the
host (`split_replay`). Where the flight recorder or max_bytes needs each record on this side, the
replay's records are made here one by one.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import torch

from tensortap.capture import device_stats, graphs, stats_kernel, trigger
from tensortap.capture.job import RECORD_KEYS, Job, Replay, join_json, meta_json, pace_for_gpu, yield_gil
from tensortap.capture.staging import Staged
from tensortap.capture.state import ScopeState, current_scope, dtype_of, on_device


class GraphRecords:
    """Tap's CUDA-graph paths (a mixin: it uses the Tap's filter, graph registry, seq and writer)."""

    def _record_in_graph(self, entry, name: str, layer: int, point: str, tensor: torch.Tensor,
                         state: ScopeState) -> None:
        """A slot of the graph being captured: the copy (or the stats) is made by the graph itself, into
        the graph's arena."""
        scope_tensors = on_device(state.tensors, tensor.device)
        keeps_data = self._keeps_data(tensor)
        plan = None if keeps_data else stats_kernel.plan(tensor, point)
        made = tensor.nbytes if keeps_data else plan.row_bytes * tensor.shape[0] if plan else 0  # the slot's bytes
        if not self.graphs.fits(name, made + sum(t.nbytes for t in scope_tensors.values())):
            return
        watched = trigger.which(point, self.recorder.triggers) if self.recorder is not None else None
        if keeps_data:
            tensors = {"data": tensor}
        else:
            tensors = device_stats.partials(tensor, point, graphs.by_rows(point, tensor),
                                            functools.partial(entry.empty, tensor.device))
        tensors.update(scope_tensors)
        buffers = graphs.slot_buffers(tensors, tensor, watched, point, entry)
        meta = dict(state.meta)
        meta.update(name=name, point=point, layer=layer, rank=state.rank, dtype=dtype_of(tensor),
                    shape=list(tensor.shape))
        meta.setdefault("world_size", state.world)
        self.graphs.add(entry, name, point, meta, buffers)
        pace_for_gpu()  # its replays are drained on the writer side

    def after_replay(self, graph) -> None:
        """After a replay: the graph's slots, drained in one copy, become records stamped with the scope:
        on the writer side (one Replay handed over: `split_replay`), or here where the flight recorder or
        max_bytes needs each record now."""
        state = current_scope.get() or self.root()
        if self.lean_ready:
            self._hand_over_replay(graph, state)
        else:
            for meta, tensors, signal, on_host in self.graphs.records(graph, state.meta, state.tensors):
                if not self.filter.keeps_forward(meta.get("step"), meta.get("rank"), meta.get("role")):
                    self.excluded += 1
                    continue
                meta["seq"], meta["time_ns"] = next(self._seq), time.time_ns()
                meta["dropped_before"] = self.counters.dropped
                first = next(iter(tensors.values()))
                staged = Staged(tensors, torch.cuda.current_stream(first.device) if first.is_cuda else None)
                staged.on_host = on_host
                self._deliver(meta, staged, None, signal)
        if current_scope.get() is None:
            self.submit_pending()
            self._end_scope()

    def _hand_over_replay(self, graph, state: ScopeState) -> None:
        """The model's thread per replay: the filter per slot, one copy of the slots (of a CUDA graph:
        straight to pinned host memory, on a drain stream), one Replay queued."""
        entry = self.graphs.entry(graph)
        if entry is None or not entry.parts:
            return
        stamp = graphs.Registry.stamp(entry, state.meta)
        kept, verdicts = [], {}
        for slot in entry.slots:
            key = tuple(stamp[k] if k in stamp else slot.meta.get(k) for k in ("step", "rank", "role"))
            keeps = verdicts.get(key)
            if keeps is None:
                keeps = verdicts[key] = self.filter.keeps_forward(*key)
            if keeps:
                kept.append((slot, next(self._seq)))
            else:
                self.excluded += 1
        if not kept:
            return
        scope_tensors = on_device(state.tensors, entry.device) if state.tensors else {}
        lease = self.stager.pooled_lease(entry.total, 1) if entry.device.type == "cuda" and not scope_tensors else None
        if lease is not None:  # the host copy is made here; the writer waits for `ready` (split_replay)
            staged = Staged({"packed": lease.buffer[:entry.total]})
            staged.lease, staged.ready = lease, self.graphs.to_pinned(entry, lease)
        else:  # no pooled pinned buffer of that size yet, or scope tensors: the writer copies to the host
            _, flat = self.graphs.pack(graph)
            staged = Staged({"packed": flat, **scope_tensors}, entry.stream if flat.is_cuda else None)
            staged.ready = entry.drained if flat.is_cuda else None  # after the copy: the writer's copy waits for it
        self.pend(Replay(entry, kept, stamp, time.time_ns(), self.counters.dropped, staged))

    def split_replay(self, replay: Replay) -> list[Job]:
        """Writer side, once a replay's copy is on the host: its records, views into that copy (they
        share its pinned lease), stamped and trimmed as `graphs.slot_records` says, stats finished."""
        staged = replay.staged
        if staged.stream is None and staged.ready is not None:  # copied to pinned memory by the model's thread
            staged.ready.synchronize()
            staged.ready = None
        host = dict(staged.tensors)
        flat = host.pop("packed")  # uint8 [total]: a numpy view of the lease (CUDA), or the CPU copy itself
        if isinstance(flat, np.ndarray):
            packed = torch.from_numpy(flat)  # uint8 [total], the same memory
        else:
            packed, flat = flat, flat.numpy()
        drained = graphs.host_slots([slot for slot, _ in replay.kept], packed, flat)
        stamp = replay.stamp
        left_out = frozenset(stamp.keys() | set(RECORD_KEYS))  # what a slot's own JSON part leaves out
        stamp_json = meta_json({k: v for k, v in stamp.items() if k not in RECORD_KEYS})  # once per replay
        jobs = []
        for (meta, tensors, _, on_host), (slot, seq) in zip(graphs.slot_records(drained, stamp, host), replay.kept):
            meta["seq"], meta["time_ns"], meta["dropped_before"] = seq, replay.time_ns, replay.dropped
            own = tuple(key[5:] for key in tensors if key.startswith("meta:"))  # host_arrays adds them
            base_json = None  # a tensor over a host value of the same key: the whole metadata is encoded
            if not own or (slot.meta.keys() | stamp.keys()).isdisjoint(own):
                slot_json = slot.json.get(left_out)
                if slot_json is None:  # once per slot (and set of stamped keys)
                    slot_json = slot.json[left_out] = meta_json({k: v for k, v in slot.meta.items()
                                                                 if k not in left_out})
                base_json = join_json(slot_json, stamp_json)
            if on_host is not None:
                tensors = on_host(tensors)
            record = Staged(tensors)
            record.lease = staged.lease
            jobs.append(Job(meta, record, self.full and "data" in tensors, base_json, own))
            yield_gil()
        if staged.lease is not None:
            staged.lease.holders += len(jobs) - 1  # the replay's share of its lease goes to its records
        staged.tensors, staged.lease = {}, None
        return jobs
