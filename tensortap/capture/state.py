"""What a tap keeps per scope, and the small helpers every record path shares.

A scope's state is computed once when it opens (Tap.enter) and read by every point inside it; it is
the value of `current_scope`, so scopes nest per thread and per task.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch

from tensortap.format.codecs import dtype_name

PENDING_JOBS = 64  # a scope hands its records over at exit, or every this many
MAX_NDIM = 8
CLONE_NUMEL = 32768  # CPU tensors of fewer elements are snapshotted by clone(): below torch's parallel grain
SCALARS = (int, str, float, bool)  # metadata values checked once per (key, type, value)
FORWARD = frozenset(("step", "role", "rank"))  # call metadata that changes the per-scope filter verdict
PER_CALL = FORWARD | {"name", "point", "layer"}  # call metadata that makes the point's state its own


class ScopeState:
    """What a scope computed once for every point inside it."""

    __slots__ = ("meta", "tensors", "rank", "world", "keeps", "checked", "validated", "base", "lean", "base_json")

    def __init__(self, meta: dict, tensors: dict, rank: int, world: int, keeps: bool, checked: bool = True):
        self.meta = meta  # validated host metadata, merged over the enclosing scopes
        self.tensors = tensors  # "meta:<key>" -> snapshot of a device tensor given to the scope
        self.rank, self.world = rank, world
        self.keeps = keeps  # Filter.keeps_forward(step, rank, role)
        self.checked = checked  # False: a rejected scope whose other keys were not validated (nothing to record)
        self.validated: ScopeState | None = None  # of an unchecked scope: its validated state, made once
        self.base: dict | None = None  # meta with rank and world size: what its records start from (Tap._base)
        self.lean = False  # its CPU points may take Tap.lean_record (kept, no tensor metadata, outside captures)
        self.base_json: str | None = None  # `base` without job.RECORD_KEYS as JSON (Tap.expand, writer side)


current_scope: ContextVar[ScopeState | None] = ContextVar("tensortap_scope", default=None)


def dtype_of(tensor: torch.Tensor) -> str:
    name = DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        name = DTYPE_NAMES[tensor.dtype] = dtype_name(tensor.dtype)
    return name


DTYPE_NAMES: dict = {}


def on_device(tensors: dict, device: torch.device) -> dict:
    """The scope snapshots that travel with a record on `device` (a record's tensors share one device)."""
    return {key: value for key, value in tensors.items() if value.device == device}


def check_storable(name: str, tensor: torch.Tensor) -> None:
    """Raise (one line, naming the point) for a tensor the format cannot store."""
    if tensor.dim() > MAX_NDIM:
        raise ValueError(f"{name}: {tensor.dim()} dimensions, at most {MAX_NDIM} are stored")
    if tensor.dtype not in DTYPE_NAMES:
        dtype_of(tensor)  # raises for a dtype the format has no name for
