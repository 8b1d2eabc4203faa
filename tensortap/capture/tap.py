"""The enabled tap: what a tap point does once TAP is set (the public functions are in runtime.py).

The work is split by how often it changes:

    per scope   metadata validated against the record schema, the rank, the step/role/rank part
                of the filter (Filter.keeps_forward), tensor metadata snapshotted once, and the
                metadata every record starts from (with rank and world size); a scope the filter
                rejects validates only step, role and rank
    per name    layer and point parsed and checked, the point/layer part of the filter (cached)
    per call    lean (`lean_record`: a CPU tensor in a kept scope without tensor metadata, outside
                captures, point metadata all scalars seen valid before, no flight recorder and no
                max_bytes): the snapshot and one tuple (scope, name, its metadata, snapshot, seq,
                time); the writer side makes the record (`expand`) and encodes the scope's metadata
                as JSON once per scope.
                otherwise: one copy of the scope's metadata with the name, the point's own metadata
                (a scalar seen valid before costs a set lookup), seq and time; the snapshot (eager,
                into a pooled host buffer on the CPU: staging.py), or a slot inside a CUDA graph
                being captured (graphs.py); mode=stats on a GPU computes its stats there
                (device_stats.py); with `trigger=` the record goes to the flight recorder
                (trigger.py) instead of the writer
    per replay  of a CUDA graph: one copy of its slots and the filter per slot; the writer side cuts
                the records out of the copy on the host (`split_replay`), unless the flight recorder
                or max_bytes needs each record on this side

Shape, dtype and byte count are taken from the snapshot on the writer side.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time

import numpy as np
import torch

from tensortap import vocab
from tensortap.capture import device_stats, graphs, trigger
from tensortap.capture.identity import discover_rank, run_identity
from tensortap.capture.job import Job, record_count, reset_pace
from tensortap.capture.lean import LeanRecords
from tensortap.capture.replays import GraphRecords
from tensortap.capture.seen import Seen, filter_text
from tensortap.capture.staging import Staged, Stager
from tensortap.capture.state import (FORWARD, PENDING_JOBS, PER_CALL, SCALARS, ScopeState, check_storable,
                                     current_scope, dtype_of, on_device)
from tensortap.capture.writer import Counters, Writer, make_sink
from tensortap.config import TapConfig
from tensortap.format import schema

log = logging.getLogger("tensortap")

_DROP = object()
_WRITER_KEYS = frozenset(("stats", "stored"))  # record fields only the writer sets (caller values dropped)
field_problem = schema.field_problem


class Tap(LeanRecords, GraphRecords):
    """An enabled tap: config, filter, counters, stager, graph slots, flight recorder, writer."""

    def __init__(self, config: TapConfig):
        self.config = config
        self.filter = config.filter
        self.full = config.mode == "full"
        self.counters = Counters()
        self.stager = Stager()
        reset_pace()  # the writer's GIL pace: the CPU's until this tap sees a CUDA record
        self.writer: Writer | None = None
        self.budget_spent = False
        self._bytes_accepted = 0
        self._seq = itertools.count()
        self._names: dict[str, tuple] = {}  # name -> (layer, point, keeps_point) or (None, None, problem)
        self._valid: set = set()  # (key, type, scalar value) the schema accepted (lean_record reads it too)
        self._rank: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._local = threading.local()  # per thread: jobs of the open scope, handed over at its exit
        self.excluded = 0  # point calls the filter rejected
        self.seen = Seen()  # what the filter saw: for the message when nothing was written
        self.graphs = graphs.Registry(config.graph_bytes, self._warn_once, self.counters)
        self.recorder = (trigger.FlightRecorder(config, self._submit_now, self._trigger_record, self.counters,
                                                self._warn_once) if config.trigger else None)
        self._device_stats = _from_parts_available()
        self._data_always = self.full or self.recorder is not None or not self._device_stats  # no device stats
        self._lean_config = self.recorder is None and config.max_bytes is None  # Tap.lean_record may serve
        self.lean_ready = False  # ... once the writer is running and while capture goes on (budget, failure)

    # -- per scope ------------------------------------------------------------------------------------
    def enter(self, raw: dict, parent: ScopeState | None, validate_all: bool = False) -> ScopeState:
        """The state of a scope with metadata `raw` inside `parent`: validated once, filtered once. A scope
        the filter rejects (outside a graph capture) validates only step, role and rank, unless
        `validate_all` (a point or a nested scope inside it may still turn out to be kept)."""
        if parent is not None and not parent.checked:
            parent = self.validated(parent)
        meta = dict(parent.meta) if parent is not None else {}
        tensors = dict(parent.tensors) if parent is not None else {}
        capturing = self.graphs.active and self.graphs.capturing() is not None
        if not capturing and not validate_all and not FORWARD.isdisjoint(raw):
            trial = dict(meta)
            for key in FORWARD.intersection(raw):  # a bad value counts once, below
                value = raw[key].item() if isinstance(raw[key], np.generic) else raw[key]
                if field_problem(key, value) is None:
                    trial[key] = value
                else:
                    trial.pop(key, None)
            rank, world = self.rank_and_world(trial)
            if not self.filter.keeps_forward(trial.get("step"), rank, trial.get("role")):
                self.seen.rejected(trial.get("step"), trial.get("role"), rank)
                meta.update(raw)
                return ScopeState(meta, tensors, rank, world, False, checked=False)
        given = []
        for key, value in raw.items():
            tensors.pop("meta:" + key, None)
            if isinstance(value, torch.Tensor):
                meta.pop(key, None)
                given.append((key, value))
                continue
            value = self._checked(key, value)
            if value is _DROP:
                meta.pop(key, None)
            else:
                meta[key] = value
        rank, world = self.rank_and_world(meta)
        keeps = self.filter.keeps_forward(meta.get("step"), rank, meta.get("role"))
        if not keeps:
            self.seen.rejected(meta.get("step"), meta.get("role"), rank)
        if given and (keeps or capturing or validate_all):
            for key, value in given:
                if value.is_cuda:
                    tensors["meta:" + key] = self._meta_snapshot(value)  # once per scope
                else:
                    self._set_checked(meta, key, value.tolist())
        state = ScopeState(meta, tensors, rank, world, keeps)
        if keeps and self._lean_config and not capturing and not tensors:
            state.lean = True
            self._base(state)  # what its lean records start from (the writer side copies it)
        return state

    def validated(self, state: ScopeState) -> ScopeState:
        """A rejected scope's state with all of its metadata validated (tensors snapshotted), for a point
        or a nested scope inside it that changes step, role or rank."""
        if state.validated is None:  # once per scope, however many points inside it need it
            bare = ScopeState({}, state.tensors, state.rank, state.world, state.keeps)
            state.validated = self.enter(state.meta, bare, validate_all=True)
        return state.validated

    def _checked(self, key: str, value):
        """A metadata value as the record schema wants it, or _DROP (an error, reported once per key).
        Scalars already seen valid for a key are not checked again."""
        kind = type(value)
        if kind in SCALARS:
            if (key, kind, value) in self._valid:  # the type too: True == 1 == 1.0
                return value
            if field_problem(key, value) is None and key not in _WRITER_KEYS:
                if len(self._valid) < 65536:
                    self._valid.add((key, kind, value))
                return value
        if isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, tuple):
            value = list(value)
        problem = schema.field_problem(key, value)
        if key in _WRITER_KEYS:
            problem = f"{key} is written by the writer itself (the record's {key}); use another key"
        if problem is None:
            return value
        self.counters.errors += 1
        self._warn_once("meta:" + key, "tensortap: metadata dropped: %s; pass a valid value (the record is kept "
                        "without it)", problem)
        return _DROP

    def _set_checked(self, meta: dict, key: str, value) -> None:
        value = self._checked(key, value)
        if value is not _DROP:
            meta[key] = value

    def root(self) -> ScopeState:
        """The state of a point called outside any scope."""
        return self.enter({}, None)

    # -- per name -------------------------------------------------------------------------------------
    def name_info(self, name: str) -> tuple:
        info = self._names.get(name)
        if info is None:
            info = self._names[name] = self._parse_name(name)
        return info

    def _parse_name(self, name) -> tuple:
        parts = name.split(".") if isinstance(name, str) else []
        point = parts[-1] if parts else None
        if len(parts) != 4 or parts[0] != "layers" or parts[2] != "attn" or not parts[1].isdigit() \
                or point not in vocab.POINTS:
            return (None, None, f"tap point name {name!r} is not layers.<L>.attn.<point> with a point among "
                                f"{', '.join(vocab.POINTS)}")
        layer = int(parts[1])
        self.seen.name(layer, point)
        return (layer, point, self.filter.keeps_point(point, layer))

    # -- per call -------------------------------------------------------------------------------------
    def record(self, name: str, tensor, meta: dict) -> None:
        try:
            self._record(name, tensor, meta)
        except Exception as exc:  # never into the model's forward
            self.counters.errors += 1
            self._warn_once("error", "tensortap: tap point %r failed (%s: %s); the model keeps running", name,
                            type(exc).__name__, exc)

    def _record(self, name: str, tensor, meta: dict) -> None:
        layer, point, keeps = self._names.get(name) or self.name_info(name)
        if keeps is not True:
            if point is None:
                raise ValueError(keeps)
            self.excluded += 1
            return
        scope = current_scope.get()
        state = scope or self.root()
        entry = self.graphs.capturing() if self.graphs.active else None
        if meta and (entry is not None or not PER_CALL.isdisjoint(meta)):
            state, meta = self._with_call_meta(state, meta), None  # its own step, role, rank, name, ...
        if entry is None and not state.keeps:
            self.excluded += 1  # the scope's verdict stands: no work for its points
            return
        if self.writer is not None and self.writer.failed is not None:
            self.counters.lost += 1
            return
        if self.budget_spent and self.recorder is None and entry is None:  # max_bytes reached: no snapshot
            self.counters.over_budget += 1
            return
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        check_storable(name, tensor)  # a tensor the format cannot store fails here, not in the writer
        if entry is not None:
            self._record_in_graph(entry, name, layer, point, tensor, state)
            return
        if tensor.is_cuda and torch.cuda.is_current_stream_capturing():  # a capture the hooks do not see
            self.counters.graph_skipped += 1
            self._warn_once("graph", "tensortap: a tap point inside a CUDA-graph capture that is not a "
                            "torch.cuda.CUDAGraph is skipped (%s)", name)
            return
        job_meta = dict(state.base or self._base(state))  # the one per-record copy of the scope's metadata
        job_meta["name"], job_meta["point"], job_meta["layer"] = name, point, layer
        scope_tensors = self._put_call_meta(job_meta, state.tensors, meta) if meta else state.tensors
        job_meta["seq"], job_meta["time_ns"] = next(self._seq), time.time_ns()
        job_meta["dropped_before"] = self.counters.dropped
        self._emit(job_meta, tensor, point, scope_tensors)
        if scope is None:
            self.submit_pending()
            self._end_scope()

    @staticmethod
    def _base(state: ScopeState) -> dict:
        """What every record of a scope starts from, made once per scope: its metadata, rank and world size."""
        base = dict(state.meta)
        base["rank"] = state.rank
        if "world_size" not in base:
            base["world_size"] = state.world
        state.base = base
        return base

    def _put_call_meta(self, meta: dict, scope_tensors: dict, call: dict) -> dict:
        """A point's own metadata (not step, role, rank, name, point or layer) into its record's `meta`:
        scalars seen valid before cost one set lookup, tensors are snapshotted per call. Returns the
        record's "meta:*" tensors (the scope's, or a private copy when the call changes them)."""
        tensors, valid = scope_tensors, self._valid
        for key, value in call.items():
            kind = value.__class__
            if kind in SCALARS and (key, kind, value) in valid and not (tensors and "meta:" + key in tensors):
                meta[key] = value  # the common case: a value the schema accepted before
                continue
            if isinstance(value, torch.Tensor):
                if tensors is scope_tensors:
                    tensors = dict(tensors)
                meta.pop(key, None)
                if value.is_cuda:
                    tensors["meta:" + key] = self._meta_snapshot(value)
                else:
                    self._set_checked(meta, key, value.tolist())
                continue
            if tensors and "meta:" + key in tensors:  # a host value over the scope's tensor of that key
                tensors = dict(tensors) if tensors is scope_tensors else tensors
                del tensors["meta:" + key]
            value = self._checked(key, value)
            if value is _DROP:
                meta.pop(key, None)
            else:
                meta[key] = value
        return tensors

    def _meta_snapshot(self, value: torch.Tensor) -> torch.Tensor:
        """A device tensor given as metadata, copied: inside a graph capture into the graph's arena (the
        graph rewrites it at every replay), else by a clone on the caller's stream."""
        entry = self.graphs.capturing() if self.graphs.active else None
        if entry is None:
            return value.detach().clone()
        return entry.snapshot(value.detach())

    def _with_call_meta(self, state: ScopeState, meta: dict) -> ScopeState:
        """A point's own metadata over its scope's, as a state of its own: validated, its tensors
        snapshotted per call; rank and filter verdict recomputed only when it sets step, role or rank."""
        if not state.checked:
            state = self.validated(state)
        merged = dict(state.meta)
        tensors = self._put_call_meta(merged, state.tensors, meta)
        if FORWARD.isdisjoint(meta):
            return ScopeState(merged, tensors, state.rank, state.world, state.keeps)
        rank, world = self.rank_and_world(merged)
        return ScopeState(merged, tensors, rank, world,
                          self.filter.keeps_forward(merged.get("step"), rank, merged.get("role")))

    def _keeps_data(self, tensor: torch.Tensor) -> bool:
        """Does the record carry the tensor itself (full mode, the flight recorder, stats on the CPU), or
        only the stats partials computed on its device (mode=stats on a GPU)?"""
        return self._data_always or not tensor.is_cuda

    def _emit(self, meta: dict, tensor: torch.Tensor, point: str, scope_tensors: dict) -> None:
        """Snapshot the tensor on the caller's thread or stream, or compute its stats partials there (the
        tensor itself then never leaves the device), and deliver the record. Scope snapshots travel
        with it; the writer takes dtype and shape from the snapshot."""
        extra = on_device(scope_tensors, tensor.device) if scope_tensors else None
        if self._keeps_data(tensor):
            staged = self.stager.stage({"data": tensor})
        else:
            staged = Staged(device_stats.partials(tensor, point), torch.cuda.current_stream(tensor.device))
            staged.on_host = device_stats.finish_on_host  # the parts, assembled by the writer on the host
            meta["dtype"], meta["shape"] = dtype_of(tensor), list(tensor.shape)
        if extra:
            staged.add(extra)
        self._deliver(meta, staged, tensor)

    def _deliver(self, meta: dict, staged: Staged, tensor: torch.Tensor | None, signal=None) -> None:
        point = meta["point"]
        if self.recorder is not None:
            watched = trigger.which(point, self.recorder.triggers)
            if watched is not None:
                value = signal if signal is not None else (trigger.signal(watched, tensor) if tensor is not None else None)
                if value is not None:
                    self.recorder.note(self._where(watched, meta, meta["name"], point, meta.get("layer"),
                                                   meta.get("rank")), value)
            self._writer(meta["rank"], meta["world_size"])
            self.recorder.offer(meta.get("step"), [Job(meta, staged, True)])
            return
        full = self.full and "data" in staged.tensors
        if self.config.max_bytes is not None:
            data = staged.tensors["data"] if full else None
            if self._over_budget(data.numel() * data.element_size() if full else 0):
                return
        if self.writer is None:
            self._writer(meta["rank"], meta["world_size"])
        self.pend(Job(meta, staged, full))

    @staticmethod
    def _where(watched: str, meta: dict, name: str, point: str, layer, rank) -> dict:
        return dict(trigger=watched, name=name, point=point, layer=layer, step=meta.get("step"),
                    role=meta.get("role"), spec_pos=meta.get("spec_pos"), rank=rank)

    # -- hand-over ------------------------------------------------------------------------------------
    def pend(self, job) -> None:
        """Queue a Job, a lean record's tuple or a Replay on this thread; handed over at scope exit, or
        once PENDING_JOBS wait."""
        pending = self._local.__dict__.get("jobs")
        if pending is None:
            pending = self._local.jobs = []
        pending.append(job)
        if len(pending) >= PENDING_JOBS:
            self.submit_pending()

    def submit_pending(self) -> None:
        """Hand this thread's jobs to the writer (at scope exit, at flush, or when enough are waiting)."""
        pending = getattr(self._local, "jobs", None)
        if pending and self.writer is not None:
            self._local.jobs = []
            try:
                self._submit_now(pending)
            except Exception:
                self.counters.lost += record_count(pending)  # handed over to nobody: counted, then said once
                raise

    def _submit_now(self, jobs: list) -> None:
        Stager.mark_ready([job.staged for job in jobs if job.__class__ is not tuple])  # a lean record is CPU
        self.writer.submit(jobs)

    def _end_scope(self) -> None:
        if self.recorder is not None:
            self.recorder.end_scope()

    def _trigger_record(self, info: dict) -> None:
        """The flight recorder's record of a trigger: which fired, where (point, layer, role, rank) and when."""
        rank = info.get("rank") if info.get("rank") is not None else self.rank_and_world({})[0]
        meta = {"name": "tensortap.trigger", "point": "trigger", "step": info.get("step"), "rank": rank,
                "world_size": self.rank_and_world({})[1], "trigger": {k: v for k, v in info.items() if v is not None},
                "seq": next(self._seq), "time_ns": time.time_ns(), "dropped_before": self.counters.dropped,
                "dtype": "int64", "shape": [1]}
        if meta["step"] is None:
            meta.pop("step")
        staged = Staged({"data": torch.tensor([info["value"]], dtype=torch.int64)})  # [1], a fresh tensor
        self._writer(rank, meta["world_size"])
        self._submit_now([Job(meta, staged, True)])

    def _over_budget(self, nbytes: int) -> bool:
        limit = self.config.max_bytes
        if limit is None:
            return False
        with self._lock:
            if self.budget_spent or self._bytes_accepted + nbytes > limit:
                self.budget_spent = True
                self.counters.over_budget += 1
                self._warn_once("budget", "tensortap: max_bytes=%d reached on this rank; capture stops here "
                                "(%d bytes captured)", limit, self._bytes_accepted)
                return True
            self._bytes_accepted += nbytes
        return False

    # -- helpers -------------------------------------------------------------------------------------
    def rank_and_world(self, merged: dict) -> tuple[int, int]:
        if self._rank is None:
            rank, world, from_group = discover_rank()
            if from_group:
                self._rank = (rank, world)
        else:
            rank, world = self._rank
        return merged.get("rank", rank), world

    def _writer(self, rank: int, world_size: int) -> Writer:
        if self.writer is None:
            with self._lock:
                if self.writer is None:
                    identity = run_identity(rank, world_size)
                    identity["config"] = self.config.to_json_dict()
                    self.writer = Writer(functools.partial(make_sink, self.config, rank, identity), self.stager,
                                         self.config.queue_bytes, self.config.on_full, self.counters, self.expand,
                                         self._stop_lean, self.split_replay)
                    self.lean_ready = self._lean_config
        return self.writer

    def _stop_lean(self) -> None:
        """The writer failed: every point takes `record` again (which counts them lost)."""
        self.lean_ready = False

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.error(message, *args)

    def wants(self, name: str, meta: dict) -> bool:
        try:
            _, point, keeps = self.name_info(name)
            if point is None:
                raise ValueError(keeps)
            if not keeps or self.budget_spent:
                return False
            if self.graphs.capturing() is not None:
                return True  # the step is known only at replay
            state = current_scope.get() or self.root()
            return self._with_call_meta(state, meta).keeps if meta else state.keeps
        except Exception as exc:  # never into the model's forward
            self.counters.errors += 1
            self._warn_once("error", "tensortap: wants(%r) failed (%s: %s)", name, type(exc).__name__, exc)
            return False

    def flush(self, timeout: float | None = None) -> bool:
        self.submit_pending()
        if self.recorder is not None:
            self.recorder.end_scope()
        return self.writer.flush(timeout) if self.writer is not None else True

    def close(self, timeout: float | None = None) -> None:
        self.submit_pending()
        if self.recorder is not None:
            self.recorder.end_scope()
            self.recorder.poll(wait=True)
        if self.writer is not None:
            self.writer.close(timeout)
        if self.counters.records == 0 and self.excluded:
            log.warning("tensortap: nothing was written: the filter (%s) excluded all %d tap point call(s); "
                        "they had %s", filter_text(self.config), self.excluded, self.seen.text())


def _from_parts_available() -> bool:
    """Stats-only records from device parts need the writer side's format.stats.from_parts."""
    try:
        from tensortap.format import stats as host_stats
    except ImportError:
        return False
    return hasattr(host_stats, "from_parts")



