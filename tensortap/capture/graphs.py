"""Tap points inside CUDA graphs: static slots written by the graph, drained after each replay.

A replay runs no Python, so a point reached while a graph is being captured does its work in the
graph instead: a device-to-device copy of the tensor (or, with mode=stats, the small stats partials,
per row where rows are tokens: device_stats.py) into tensors the tap owns. Those tensors live in the
graph's memory pool and are rewritten by every replay. The tap registers them as one slot (name,
metadata at capture, keys, bytes) of that graph.

    capture_begin(g)   this thread's points record slots of g (class-level hook)
    capture_end(g)     g's slots are frozen into one drain plan: the flat byte views of every buffer
    replay(g)          after the replay, one batched copy (torch.cat of the views) on the replay's
                       stream, ordered before the next replay; each slot becomes a record stamped
                       with the host scope active at the replay (step, role, spec_pos, phase,
                       num_tokens, req_ids; rows past num_tokens are padding, trimmed), then takes
                       the eager path: pinned host copy, writer.

Graph-resident bytes count against `graph_bytes`; past it the tap says so once and skips the point
(counted as graph_skipped). The hooks are installed on a class once, when a tap is enabled; with TAP
unset nothing is patched.
"""

from __future__ import annotations

import functools
import itertools
import threading
import weakref
from dataclasses import dataclass, field

import torch

from tensortap.capture import device_stats, trigger
from tensortap.capture.staging import host_view

ALIGN = 16  # bytes: each buffer starts aligned in the drained copy, so views of any dtype work
UNTRIMMED = ("kv_pages", "block_table")  # points whose dimension 0 is not the token


@dataclass
class Slot:
    """One tap point of one graph: its metadata at capture and the buffers the graph writes."""

    name: str
    point: str
    meta: dict  # metadata merged at capture (layer, head_offset, ...); the replay's scope wins over it
    buffers: dict  # key ("data", "meta:<key>", "stats:<part>", "signal") -> static tensor
    nbytes: int
    offsets: dict = field(default_factory=dict)  # key -> byte offset in the drained copy
    json: dict = field(default_factory=dict)  # keys left out -> `meta` without them as JSON (Tap.split_replay)


@dataclass
class GraphSlots:
    """The slots of one captured graph and its drain plan."""

    index: int  # stamped on its records as `graph`
    slots: list = field(default_factory=list)
    nbytes: int = 0
    views: list | None = None  # flat uint8 views (and alignment pads) of every buffer, in slot order
    total: int = 0
    drained: torch.cuda.Event | None = None  # after the last drain
    stream: object = None  # the stream of the last drain


class Registry:
    """Slots per graph, the graph being captured on each thread, and the graph_bytes budget."""

    def __init__(self, budget: int, warn, counters):
        self.budget = budget
        self.bytes = 0
        self._warn = warn  # warn(key, message, *args): once per key
        self._counters = counters
        self._graphs: dict[int, GraphSlots] = {}
        self._local = threading.local()
        self.active = 0  # captures in progress (any thread): points look for their graph only then
        self._index = itertools.count()

    # -- capture ---------------------------------------------------------------------------------------
    def begin(self, graph) -> None:
        """capture_begin: a (re-)capture of `graph` starts with no slots."""
        self.forget(id(graph))
        entry = self._graphs[id(graph)] = GraphSlots(next(self._index))
        self._local.capturing = entry
        self.active += 1
        try:
            weakref.finalize(graph, self.forget, id(graph))
        except TypeError:  # a class without weak references: its slots live as long as the tap
            pass

    def capturing(self) -> GraphSlots | None:
        """The graph this thread is capturing through a hooked class, if any."""
        return getattr(self._local, "capturing", None)

    def add(self, entry: GraphSlots, name: str, point: str, meta: dict, buffers: dict) -> bool:
        """Register a slot whose buffers the graph writes; False (and counted) past the budget."""
        nbytes = sum(b.numel() * b.element_size() for b in buffers.values())
        if self.bytes + nbytes > self.budget:
            self._counters.graph_skipped += 1
            self._warn("graph_bytes", "tensortap: graph_bytes=%d reached (%d bytes in CUDA-graph slots); "
                       "further tap points inside graphs are skipped (%s); raise graph_bytes or narrow the filter",
                       self.budget, self.bytes, name)
            return False
        self.bytes += nbytes
        entry.slots.append(Slot(name, point, meta, buffers, nbytes))
        entry.nbytes += nbytes
        return True

    def end(self, graph) -> None:
        """capture_end: freeze the drain plan (outside the capture: the pads are ordinary tensors)."""
        entry = self._graphs.get(id(graph))
        if getattr(self._local, "capturing", None) is not None:
            self._local.capturing = None
            self.active -= 1
        if entry is None or not entry.slots:
            return
        views, offset = [], 0
        for slot in entry.slots:
            for key, buf in slot.buffers.items():
                raw = buf.reshape(-1).view(torch.uint8)  # [n]: the graph's buffer itself, not a copy
                slot.offsets[key] = offset
                pad = -raw.numel() % ALIGN
                views.append(raw)
                if pad:
                    views.append(torch.empty(pad, dtype=torch.uint8, device=raw.device))
                offset += raw.numel() + pad
        entry.views, entry.total = views, offset

    # -- replay ------------------------------------------------------------------------------------------
    def before_replay(self, graph) -> None:
        """The next replay overwrites the slots: on another stream it first waits for the last drain."""
        entry = self._graphs.get(id(graph))
        if entry is not None and entry.drained is not None and entry.stream is not None:
            stream = _current_stream(entry)
            if stream != entry.stream:
                stream.wait_event(entry.drained)

    def pack(self, graph) -> tuple[GraphSlots, torch.Tensor] | None:
        """After a replay: one batched copy of every slot on the replay's stream, ordered (an event)
        before the next replay overwrites them; (the graph's slots, the copy uint8 [total]). None when
        the graph has no slots."""
        entry = self._graphs.get(id(graph))
        if entry is None or not entry.views:
            return None
        packed = torch.cat(entry.views) if len(entry.views) > 1 else entry.views[0].clone()  # [total] uint8
        if packed.is_cuda:
            entry.stream = torch.cuda.current_stream(packed.device)
            entry.drained = torch.cuda.Event()
            entry.drained.record(entry.stream)
        return entry, packed

    def drain(self, graph) -> list[tuple[Slot, dict]] | None:
        """`pack`, then per slot its tensors (views into the copy). None when the graph has no slots."""
        packed = self.pack(graph)
        if packed is None:
            return None
        entry, flat = packed
        out = []
        for slot in entry.slots:
            tensors = {}
            for key, buf in slot.buffers.items():
                start = slot.offsets[key]
                n = buf.numel() * buf.element_size()
                tensors[key] = flat[start:start + n].view(buf.dtype).view(buf.shape)  # [*shape]
            out.append((slot, tensors))
        return out

    @staticmethod
    def stamp(entry: GraphSlots, scope_meta: dict) -> dict:
        """What the host scope at a replay gives every record of it (see `records`)."""
        return {"phase": "run" if "step" in scope_meta else "capture", **scope_meta, "graph": entry.index}

    def records(self, graph, stamp: dict, scope_tensors: dict):
        """After a replay: (metadata, tensors, trigger signal or None, on_host or None) per slot, drained
        in one copy. The metadata is the capture's overridden by the host scope at the replay (`stamp`)
        and `graph`; phase "run" when that scope gives the step, else "capture" (a replay with no step of
        its own still carries the capture's dummy step: readers exclude it by default rather than show it
        as a real step), unless the scope names the phase.

        num_tokens=n (the real rows; the rest is graph padding) trims a record of a point whose rows are
        tokens to its first n rows: full-mode data as a view, device stats by `on_host`, which the writer
        runs on the host (device_stats.finish of the per-row partials, for rows < n), so that junk in the
        padding cannot reach the stats, and the trigger signal of a watched point to the same rows."""
        drained = self.drain(graph)
        if not drained:
            return
        entry = self._graphs[id(graph)]
        yield from slot_records(drained, self.stamp(entry, stamp), scope_tensors)

    def index_of(self, graph) -> int | None:
        entry = self._graphs.get(id(graph))
        return entry.index if entry is not None else None

    def forget(self, key: int) -> None:
        entry = self._graphs.pop(key, None)
        if entry is not None:
            self.bytes -= entry.nbytes


def slot_records(drained: list, stamp: dict, scope_tensors: dict):
    """(metadata, tensors, trigger signal or None, on_host or None) of each drained (slot, tensors):
    the slot's metadata under `stamp`, its rows trimmed to the replay's num_tokens (Registry.records)."""
    tokens = stamp.get("num_tokens")
    for slot, tensors in drained:
        meta = {**slot.meta, **stamp}
        signal = tensors.pop("signal", None)
        signal = signal[0] if signal is not None else None  # []
        rows = real_rows(slot.point, meta.get("shape"), tokens)
        pieces = tensors.pop("signal:rows", None)
        if pieces is not None:  # the trigger sees the real rows only, as the stats do
            signal = trigger.reduce_rows(pieces, rows)  # []
        if rows is not None:
            meta["shape"] = [rows] + list(meta["shape"][1:])  # [num_tokens, ...]
            if "data" in tensors:
                tensors["data"] = tensors["data"][:rows]  # [num_tokens, ...]: a view
        on_host = None if "data" in tensors else functools.partial(device_stats.finish_on_host, n=rows)
        for key, value in scope_tensors.items():
            tensors.setdefault(key, value)
        yield meta, tensors, signal, on_host


def host_slots(slots: list, packed: torch.Tensor, flat) -> list[tuple[Slot, dict]]:
    """`slots` with their tensors as views of the drained copy on the host: `packed` (uint8 [total]) and
    `flat`, the same memory as numpy (staging.host_view: "data" torch, the rest numpy)."""
    return [(slot, {key: host_view(key, buf.dtype, buf.shape, packed, flat, slot.offsets[key])
                    for key, buf in slot.buffers.items()}) for slot in slots]


def by_rows(point: str, tensor: torch.Tensor) -> bool:
    """Are the rows of `tensor` tokens (dimension 0), which a replay's num_tokens may trim?"""
    return point not in UNTRIMMED and tensor.dim() >= 1


def real_rows(point: str, shape: list | None, tokens) -> int | None:
    """The rows to keep of a record of `point` and `shape` replayed with num_tokens=`tokens`: fewer
    than its rows, else None (nothing to trim)."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or point in UNTRIMMED or not shape:
        return None
    return tokens if 0 <= tokens < shape[0] else None


def slot_buffers(tensors: dict, tensor: torch.Tensor, watched: str | None, point: str = "") -> dict:
    """The buffers of a new slot, made inside the capture: a copy of "data" (stats partials and "meta:"
    snapshots are fresh tensors already) and, for a watched point, its trigger signal: per row
    ("signal:rows", reduced after the replay over the real rows only) when its rows are tokens, else
    the signal itself [1]."""
    if "data" in tensors:
        tensors["data"] = tensors["data"].detach().clone(memory_format=torch.contiguous_format)  # a graph node
    if watched is not None:
        pieces = trigger.row_signal(watched, tensor) if by_rows(point, tensor) else None
        if pieces is not None:
            tensors["signal:rows"] = pieces  # [T, H] or [T]
        else:
            value = trigger.signal(watched, tensor)
            if value is not None:
                tensors["signal"] = value.view(1)  # [1]
    return tensors


def _current_stream(entry: GraphSlots):
    device = entry.views[0].device if entry.views else None
    return torch.cuda.current_stream(device)


# -- class-level hooks --------------------------------------------------------------------------------------
_hooked: set = set()


def install(cls, hooks) -> bool:
    """Wrap cls.capture_begin / capture_end / replay once. `hooks` has begin(graph), end(graph),
    before_replay(graph), after_replay(graph); each is a no-op when no tap is active. Returns whether
    the class was patched now."""
    if cls in _hooked or not all(hasattr(cls, m) for m in ("capture_begin", "capture_end", "replay")):
        return False
    begin, end, replay = cls.capture_begin, cls.capture_end, cls.replay

    def capture_begin(self, *args, **kwargs):
        result = begin(self, *args, **kwargs)
        hooks.begin(self)
        return result

    def capture_end(self, *args, **kwargs):
        try:
            return end(self, *args, **kwargs)
        finally:
            hooks.end(self)

    def replay_and_drain(self, *args, **kwargs):
        hooks.before_replay(self)
        result = replay(self, *args, **kwargs)
        hooks.after_replay(self)
        return result

    for method, wrapper in (("capture_begin", capture_begin), ("capture_end", capture_end),
                            ("replay", replay_and_drain)):
        wrapper.__wrapped__ = getattr(cls, method)
        wrapper.__name__ = method
        wrapper.__doc__ = getattr(cls, method).__doc__
        setattr(cls, method, wrapper)
    _hooked.add(cls)
    return True


def uninstall(cls) -> None:
    """Undo `install` (tests)."""
    if cls not in _hooked:
        return
    for method in ("capture_begin", "capture_end", "replay"):
        setattr(cls, method, getattr(cls, method).__wrapped__)
    _hooked.discard(cls)
