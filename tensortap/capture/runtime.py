"""The capture API: `point`, `scope`, `wants`, `configure`, `flush`, `close`, `stats`.

Disabled (TAP unset, empty or 0): `point()` returns on its first line and `scope()`
returns a shared no-op context manager. Enabled: a point is filtered, snapshotted on
the caller's thread or stream, and handed to the writer thread; nothing in here ever
raises into the caller after start-up.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import logging
import os
import threading
import time
from contextvars import ContextVar

import numpy as np
import torch

from tensortap.capture.identity import discover_rank, run_identity
from tensortap.capture.staging import Stager, capturing_cuda_graph
from tensortap.capture.writer import ChildSink, Counters, Job, LocalSink, Writer
from tensortap.config import TapConfig, from_mapping, parse_tap
from tensortap.errors import TapConfigError
from tensortap.format.codecs import dtype_name
from tensortap.format.segment import SegmentWriter
from tensortap.format import schema
from tensortap.vocab import split_name

log = logging.getLogger("tensortap")

_scope: ContextVar[dict] = ContextVar("tensortap_scope", default={})
PENDING_JOBS = 64  # a scope hands its records over at exit, or every this many
MAX_NDIM = 8
_NULL_SCOPE = contextlib.nullcontext()


class Tap:
    """An enabled tap: config, filter, counters, stager and (once the first record comes) the writer."""

    def __init__(self, config: TapConfig):
        self.config = config
        self.filter = config.filter
        self.full = config.mode == "full"
        self.counters = Counters()
        self.stager = Stager()
        self.writer: Writer | None = None
        self.budget_spent = False
        self._bytes_accepted = 0
        self._seq = itertools.count()
        self._names: dict[str, tuple[int | None, str]] = {}
        self._rank: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._local = threading.local()  # per thread: jobs of the open scope, handed over at its exit

    # -- the enabled path ----------------------------------------------------------------------
    def record(self, name: str, tensor, meta: dict) -> None:
        try:
            self._record(name, tensor, meta)
        except Exception as exc:  # never into the model's forward
            self.counters.errors += 1
            self._warn_once("error", "tensortap: tap point %r failed (%s: %s); the model keeps running", name,
                            type(exc).__name__, exc)

    def _where(self, name: str, meta: dict) -> tuple[str, dict, int, int]:
        """(point, metadata merged over the scope, rank, world size) of a call: the point's own metadata
        wins, then the layer in its name, then the scope's."""
        layer_in_name, point = self._names.get(name) or self._parse_name(name)
        merged = {**_scope.get(), **meta}
        merged["layer"] = meta.get("layer", layer_in_name if layer_in_name is not None else merged.get("layer"))
        _check_indices(merged)
        rank, world_size = self.rank_and_world(merged)
        return point, merged, rank, world_size

    def _keeps(self, point: str, merged: dict, rank: int) -> bool:
        return self.filter.keeps(point, merged["layer"], merged.get("step"), rank, merged.get("role"))

    def _record(self, name: str, tensor, meta: dict) -> None:
        if self.writer is not None and self.writer.failed is not None:
            self.counters.lost += 1
            return
        point, merged, rank, world_size = self._where(name, meta)
        if not self._keeps(point, merged, rank):
            return
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(tensor)
        if tensor.dim() > MAX_NDIM:
            raise ValueError(f"{name}: {tensor.dim()} dimensions, at most {MAX_NDIM} are stored")
        if tensor.is_cuda and capturing_cuda_graph():  # nothing host-side would be replayed
            self.counters.graph_skipped += 1
            self._warn_once("graph", "tensortap: tap points inside CUDA-graph capture are skipped (%s); "
                            "run the tapped steps eagerly", name)
            return
        nbytes = tensor.numel() * tensor.element_size() if self.full else 0  # what reaches the disk
        if self._over_budget(nbytes):
            return
        staged = self._stage(tensor, merged)
        merged.update(
            name=name, point=point, rank=rank, world_size=merged.get("world_size", world_size),
            seq=next(self._seq), time_ns=time.time_ns(), dtype=dtype_name(tensor.dtype),
            shape=list(tensor.shape), dropped_before=self.counters.dropped,
        )
        self._writer(rank, world_size)
        pending = self._pending()
        pending.append(Job(merged, staged, self.full))
        if not _scope.get() or len(pending) >= PENDING_JOBS:
            self.submit_pending()

    def _pending(self) -> list:
        pending = getattr(self._local, "jobs", None)
        if pending is None:
            pending = self._local.jobs = []
        return pending

    def submit_pending(self) -> None:
        """Hand this thread's jobs to the writer (at scope exit, at flush, or when enough are waiting)."""
        pending = getattr(self._local, "jobs", None)
        if pending and self.writer is not None:
            self._local.jobs = []
            Stager.mark_ready([job.staged for job in pending])
            self.writer.submit(pending)

    def _stage(self, tensor: torch.Tensor, merged: dict):
        """Snapshot the tensor (stats mode too: its stats are computed from the host copy, off the
        caller's thread: one copy costs the caller less than a dozen small reductions)."""
        tensors = {"data": tensor}
        for key in [k for k, v in merged.items() if isinstance(v, torch.Tensor)]:
            value = merged.pop(key)
            if value.device == tensor.device and value.is_cuda:
                tensors["meta:" + key] = value  # travels with the snapshot: no sync here
            else:
                merged[key] = value.tolist()  # small host metadata (seq_lens, page_ids)
        return self.stager.stage(tensors)

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

    # -- helpers -------------------------------------------------------------------------------
    def _parse_name(self, name: str) -> tuple[int | None, str]:
        self._names[name] = parsed = split_name(name)
        return parsed

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
                    self.writer = Writer(functools.partial(_make_sink, self.config, rank, identity), self.stager,
                                         self.config.queue_bytes, self.config.on_full, self.counters)
        return self.writer

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.error(message, *args)

    def wants(self, name: str, meta: dict) -> bool:
        try:
            point, merged, rank, _ = self._where(name, meta)
            return not self.budget_spent and self._keeps(point, merged, rank)
        except Exception as exc:  # never into the model's forward
            self.counters.errors += 1
            self._warn_once("error", "tensortap: wants(%r) failed (%s: %s)", name, type(exc).__name__, exc)
            return False

    def flush(self, timeout: float | None = None) -> bool:
        self.submit_pending()
        return self.writer.flush(timeout) if self.writer is not None else True

    def close(self, timeout: float | None = None) -> None:
        self.submit_pending()
        if self.writer is not None:
            self.writer.close(timeout)


def _check_indices(meta: dict) -> None:
    """step, layer, spec_pos and rank are integers (or absent): the index and the filters rely on it."""
    for key in ("step", "layer", "spec_pos", "rank"):
        value = meta.get(key)
        if isinstance(value, np.integer):
            meta[key] = value = int(value)
        problem = schema.field_problem(key, value)
        if problem is not None:
            raise ValueError(f"metadata {problem}")


def _make_sink(config: TapConfig, rank: int, identity: dict):
    """Where records go: a writer process (outside this GIL), or h5py in the writer thread."""
    opening = dict(dir=config.dir, rank=rank, root_attrs=identity, compress=config.compress,
                   segment_records=config.segment_records, segment_bytes=config.segment_bytes)
    if config.writer == "process":
        return ChildSink(opening)
    return LocalSink(SegmentWriter(opening["dir"], rank, identity, config.compress, config.segment_records,
                                   config.segment_bytes))


# -- module state and the public functions -------------------------------------------------------
_tap: Tap | None = None


def point(name: str, tensor, **meta) -> None:
    """Record `tensor` at tap point `name` (e.g. "layers.78.attn.lse") with metadata `meta`.

    Metadata from the enclosing `scope()` is merged in; `meta` wins. Does nothing when
    the tap is disabled, and never raises into the caller.
    """
    if _tap is None:
        return
    _tap.record(name, tensor, meta)


class _Scope:
    __slots__ = ("meta", "token")

    def __init__(self, meta: dict):
        self.meta = meta

    def __enter__(self):
        self.token = _scope.set({**_scope.get(), **self.meta})
        return self

    def __exit__(self, *exc) -> None:
        _scope.reset(self.token)
        tap = _tap
        if tap is not None:
            try:
                tap.submit_pending()
            except Exception as error:  # never into the model's forward
                tap.counters.errors += 1
                tap._warn_once("error", "tensortap: handing records to the writer failed (%s)", error)


def scope(**meta):
    """Context manager holding a forward's shared metadata (step, layer, role, ...); scopes nest."""
    if _tap is None:
        return _NULL_SCOPE
    return _Scope(meta)


def wants(name: str, **meta) -> bool:
    """Would `point(name, ..., **meta)` record? Lets a caller skip work done only for the tap."""
    return _tap is not None and _tap.wants(name, meta)


def enabled() -> bool:
    return _tap is not None


def configure(tap: str | None = None, **keys) -> TapConfig | None:
    """Enable capture from Python with the TAP keys (or a TAP string); no arguments disables it.

        tensortap.configure(dir="/scratch/tap", layers="78", roles="draft")
        tensortap.configure("/scratch/tap;steps=0-9")

    An active tap is flushed and closed first.
    """
    global _tap
    if tap is not None and keys:
        raise TapConfigError("configure() takes a TAP string or keys, not both")
    config = parse_tap(tap) if tap is not None else (from_mapping(keys) if keys else None)
    if _tap is not None:
        _tap.close()
    _tap = Tap(config) if config is not None else None
    return config


def flush(timeout: float | None = None) -> bool:
    """Return when everything recorded so far is written and flushed to disk (False on timeout)."""
    return _tap.flush(timeout) if _tap is not None else True


def close(timeout: float | None = None) -> None:
    """Flush, commit the open segment and stop capturing."""
    global _tap
    tap, _tap = _tap, None
    if tap is not None:
        tap.close(timeout)


def stats() -> dict:
    """This process's capture counters: records, bytes, dropped, over_budget, lost, errors, graph_skipped."""
    return _tap.counters.as_dict() if _tap is not None else Counters().as_dict()


def current_config() -> TapConfig | None:
    return _tap.config if _tap is not None else None


def _from_environment() -> None:
    global _tap
    config = parse_tap(os.environ.get("TAP"))
    _tap = Tap(config) if config is not None else None


def _after_fork_in_child() -> None:
    """A forked child gets its own tap (and later its own writer and files), never the parent's thread."""
    global _tap
    from tensortap.capture.identity import _environment_rank

    _environment_rank.cache_clear()
    if _tap is not None:
        sink = _tap.writer.sink if _tap.writer is not None else None
        if isinstance(sink, ChildSink):  # else the parent's writer process never sees its input end
            try:
                os.close(sink._fd)
            except OSError:
                pass
        _tap = Tap(_tap.config)


_from_environment()
atexit.register(close, 30.0)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
