"""The capture API: `point`, `scope`, `wants`, `capturing`, `configure`, `flush`, `close`, `stats`.

Disabled (TAP unset, empty or 0): `point()` returns on its first line and `scope()` returns a
shared no-op context manager. Enabled, the module's `_tap` (tap.py) does the work; nothing in
here ever raises into the caller after start-up: a bad call is counted and reported once.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys

import torch

from tensortap.capture import graphs
from tensortap.capture.state import ScopeState, current_scope
from tensortap.capture.tap import Tap
from tensortap.capture.writer import ChildSink, Counters
from tensortap.config import TapConfig, from_mapping, parse_tap
from tensortap.errors import TapConfigError

_NULL_SCOPE = contextlib.nullcontext()
__all__ = ["ScopeState", "Tap"]  # re-exported: tests and integrations reach them here


class _GraphHooks:
    """What the class-level CUDAGraph hooks call: the active tap's registry, or nothing."""

    @staticmethod
    def begin(graph) -> None:
        _GraphHooks._guarded("begin", graph)

    @staticmethod
    def end(graph) -> None:
        _GraphHooks._guarded("end", graph)

    @staticmethod
    def before_replay(graph) -> None:
        _GraphHooks._guarded("before_replay", graph)

    @staticmethod
    def _guarded(what: str, graph) -> None:
        """The registry's `what` for this graph; an error is counted and said once, never raised into
        the engine's capture or replay."""
        tap = _tap
        if tap is None:
            return
        try:
            getattr(tap.graphs, what)(graph)
        except Exception as exc:  # never into the model's forward
            tap.counters.errors += 1
            tap._warn_once("error", "tensortap: CUDA-graph %s hook failed (%s: %s)", what, type(exc).__name__, exc)

    @staticmethod
    def after_replay(graph) -> None:
        tap = _tap
        if tap is not None:
            try:
                tap.after_replay(graph)
            except Exception as exc:  # never into the model's forward
                tap.counters.errors += 1
                tap._warn_once("error", "tensortap: draining CUDA-graph slots failed (%s: %s)", type(exc).__name__, exc)


_GRAPH_HOOKS = _GraphHooks()


def _new_tap(config: TapConfig | None) -> Tap | None:
    """An enabled tap, with the CUDA-graph hooks installed (once per process, only when TAP is set)."""
    if config is None:
        return None
    if "torch.cuda" in sys.modules and hasattr(torch.cuda, "CUDAGraph"):
        graphs.install(torch.cuda.CUDAGraph, _GRAPH_HOOKS)
    return Tap(config)

# -- module state and the public functions -------------------------------------------------------
_tap: Tap | None = None
_last_counters: dict | None = None  # the counters of the last closed tap: stats() after close()


def point(name: str, tensor, **meta) -> None:
    """Record `tensor` at tap point `name` (e.g. "layers.78.attn.lse") with metadata `meta`.

    Metadata from the enclosing `scope()` is merged in; `meta` wins. Does nothing when
    the tap is disabled, and never raises into the caller.
    """
    tap = _tap
    if tap is None:
        return
    info = tap._names.get(name) if name.__class__ is str else None
    if info is None:
        tap.record(name, tensor, meta)
    elif info[2] is True:
        tap.lean_record(info, name, tensor, meta)
    elif info[2] is False:  # rejected by its name: one dict lookup
        tap.excluded += 1
    else:
        tap.record(name, tensor, meta)  # a bad name: counted and said once there


class _Scope:
    __slots__ = ("meta", "token")

    def __init__(self, meta: dict):
        self.meta = meta

    def __enter__(self):
        tap = _tap
        if tap is None:  # closed since scope() was called
            self.token = current_scope.set(current_scope.get())
            return self
        try:
            state = tap.enter(self.meta, current_scope.get())
        except Exception as exc:  # never into the model's forward
            tap.counters.errors += 1
            tap._warn_once("error", "tensortap: scope(...) failed (%s: %s)", type(exc).__name__, exc)
            state = current_scope.get() or ScopeState({}, {}, 0, 1, False)
        self.token = current_scope.set(state)
        return self

    def __exit__(self, *exc) -> None:
        current_scope.reset(self.token)
        tap = _tap
        if tap is not None:
            try:
                tap.submit_pending()
                tap._end_scope()
            except Exception as error:  # never into the model's forward
                tap.counters.errors += 1
                tap._warn_once("error", "tensortap: handing records to the writer failed (%s)", error)


def scope(**meta):
    """Context manager holding a forward's shared metadata (step, layer, role, ...); scopes nest.

    Around a CUDA-graph replay it gives the replayed records their step, role, spec_pos, phase,
    num_tokens (rows past it are graph padding) and req_ids."""
    if _tap is None:
        return _NULL_SCOPE
    return _Scope(meta)


def wants(name: str, **meta) -> bool:
    """Would `point(name, ..., **meta)` record? Lets a caller skip work done only for the tap."""
    return _tap is not None and _tap.wants(name, meta)


def enabled() -> bool:
    return _tap is not None


def capturing() -> bool:
    """Is the current CUDA stream capturing a graph? False without CUDA (for integrations)."""
    cuda = sys.modules.get("torch.cuda")
    return cuda is not None and cuda.is_initialized() and cuda.is_current_stream_capturing()


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
    close()
    _tap = _new_tap(config)
    return config


def flush(timeout: float | None = None) -> bool:
    """Return when everything recorded so far is written and flushed to disk (False on timeout)."""
    return _tap.flush(timeout) if _tap is not None else True


def close(timeout: float | None = None) -> None:
    """Flush, commit the open segment and stop capturing; `stats()` keeps the final counters."""
    global _tap, _last_counters
    tap, _tap = _tap, None
    if tap is not None:
        tap.close(timeout)
        _last_counters = tap.counters.as_dict()


def stats() -> dict:
    """This process's capture counters: records, bytes, dropped, over_budget, lost, errors, graph_skipped
    (of the active tap, else of the last one closed)."""
    if _tap is not None:
        return _tap.counters.as_dict()
    return dict(_last_counters) if _last_counters is not None else Counters().as_dict()


def current_config() -> TapConfig | None:
    return _tap.config if _tap is not None else None


def _from_environment() -> None:
    """TAP from the environment; an invalid value is one line on stderr and leaves the tap off."""
    global _tap
    try:
        config = parse_tap(os.environ.get("TAP"))
    except TapConfigError as exc:
        print(f"tensortap: TAP is invalid, capture is off: {exc}", file=sys.stderr)
        config = None
    _tap = _new_tap(config)


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
        _tap = _new_tap(_tap.config)


_from_environment()
atexit.register(close, 30.0)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
