"""What the vLLM plugin knows about this process: the engine's step and phase, the cache writer's
sharding, the layer call being tapped. Plain Python, no vLLM import (the plugin's modules share it).
"""

from __future__ import annotations

import contextvars
import logging

log = logging.getLogger("tensortap")

# The layer call being tapped (a layers._Forward), seen by the hooks inside it.
ACTIVE: contextvars.ContextVar = contextvars.ContextVar("tensortap_vllm_forward", default=None)
# Set by a DSA layer's eager region while a breakable CUDA graph is captured: the layer whose region the
# capture records for replay (engine.add_eager wraps it so that each replay opens the layer's forward).
EAGER_LAYER: contextvars.ContextVar = contextvars.ContextVar("tensortap_vllm_eager_layer", default=None)
WARNED: set[str] = set()


class Engine:
    """The model runner's view, set by engine.py's wrappers around execute_model, sample_tokens,
    _dummy_run and capture_model. `phase` None: no model runner seen (the layers count steps themselves)."""

    __slots__ = ("step", "phase", "role", "req_ids", "num_tokens", "replays")

    def __init__(self):
        self.step, self.phase, self.role, self.req_ids, self.num_tokens, self.replays = -1, None, None, None, None, 0

    def save(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def restore(self, saved: tuple) -> None:
        for name, value in zip(self.__slots__, saved):
            setattr(self, name, value)


ENGINE = Engine()
# The cache writer's DCP size and interleave, read from the block table whose slot mapping writes the
# cache (Model Runner V2's BlockTables.cp_size/cp_interleave, V1's BlockTable.dcp_world_size/...).
WRITER: dict = {}


def reset() -> None:
    ENGINE.__init__()
    WRITER.clear()


def guarded(fn, *args):
    """Run tap-side code: an exception is logged once per function and swallowed; the model keeps running."""
    try:
        return fn(*args)
    except Exception as exc:
        if fn.__name__ not in WARNED:
            WARNED.add(fn.__name__)
            log.error("tensortap: vLLM tap %s failed (%s: %s); the model keeps running", fn.__name__,
                      type(exc).__name__, exc)
        return None


def capturing() -> bool:
    """Is the current CUDA stream being captured into a graph? (The capture runtime's answer where it has
    one; False on the CPU.)"""
    import tensortap

    ask = getattr(tensortap, "capturing", None)
    if ask is not None:
        return bool(ask())
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def graph_slots() -> bool:
    """Does the capture runtime turn a point met during graph capture into a graph slot (issue 8's
    `tensortap.capturing()` contract)? Without it, points inside a capture are skipped and counted."""
    import tensortap

    try:
        return callable(getattr(tensortap, "capturing", None))
    except Exception:
        return False
