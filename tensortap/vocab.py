"""The one vocabulary of tensortap: point names, roles, phases, forward keys, point groups, and the
`Filter` that selects records. Capture, the format, the analysis, the CLI and the integrations all
import these names from here; nothing else spells them out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tensortap.errors import TapConfigError

# The tap points of the contract (docs/tap-points.md), in the order the reference emits them.
POINTS = (
    "block_table",
    "q",
    "topk",
    "slots",
    "kv_pages",
    "partial_out",
    "lse",
    "merged_out",
    "attn_out",
    "o_proj_partial",
    "hidden",
)
ROLES = ("target", "draft")
# A record's phase: `run` for real forwards; `warmup` and `capture` for an engine's start-up
# forwards (profiling, CUDA-graph warm-up and capture), excluded by readers by default.
PHASES = ("run", "warmup", "capture")
DEFAULT_PHASES = ("run",)
# How `hidden` was taken: the all-reduce's sum, or the output of an all-reduce fused with RMSNorm.
HIDDEN_KINDS = ("sum", "post_norm")
# The base of the LSE a backend returns: natural log, or log2 (FlashInfer's sparse MLA).
LSE_BASES = ("e", "2")

# One forward of one layer on one rank: records sharing these keys belong together.
FORWARD_KEYS = ("step", "layer", "role", "spec_pos")

# Point groups, by the layout of their tensor.
HEAD_POINTS = ("q", "partial_out", "merged_out")  # [T, H, D]: dimension 1 is heads
LSE_POINTS = ("lse",)  # [T, H]
INDEX_POINTS = ("topk", "slots")  # [T, K] token indices with -1 padding
ROW_POINTS = ("attn_out", "o_proj_partial", "hidden")  # [T, width]
GROUP_HEAD_POINTS = ("q", "partial_out", "lse")  # heads of the whole DCP group (after the q gather)
OWN_HEAD_POINTS = ("merged_out", "attn_out")  # heads this rank owns (after the reduce-scatter)
PRE_ALL_REDUCE_POINTS = ("q", "topk", "slots", "partial_out", "lse", "merged_out", "attn_out", "o_proj_partial")

# Records that are events, not tensors of a forward: the flight recorder's trigger record.
TRIGGER_POINT = "trigger"
EVENT_POINTS = (TRIGGER_POINT,)

POINT_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def point_name(layer: int, point: str) -> str:
    """The dotted name of a tap point: layers.{L}.attn.{point}."""
    return f"layers.{layer}.attn.{point}"


def split_name(name: str) -> tuple[int | None, str]:
    """(layer or None, point) of a dotted tap-point name; the point is its last component."""
    parts = name.split(".")
    point = parts[-1]
    if not POINT_NAME.fullmatch(point):
        raise ValueError(f"tap point name {name!r} must end in a lowercase identifier, e.g. layers.3.attn.lse")
    layer = None
    if len(parts) > 2 and parts[0] == "layers":
        try:
            layer = int(parts[1])
        except ValueError:
            layer = None
    return layer, point


@dataclass(frozen=True)
class IntSet:
    """Inclusive integer ranges, e.g. ``0,78`` or ``100-140``."""

    ranges: tuple[tuple[int, int], ...]

    def __contains__(self, value: int) -> bool:
        return any(lo <= value <= hi for lo, hi in self.ranges)

    def __str__(self) -> str:
        return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ranges)

    @classmethod
    def parse(cls, key: str, text: str) -> "IntSet":
        ranges = []
        for item in text.split(","):
            item = item.strip()
            m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", item)
            if not m:
                raise TapConfigError(
                    f"TAP key '{key}': '{item}' is not an integer or an inclusive range a-b; "
                    f"write e.g. {key}=0,3,10-20"
                )
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise TapConfigError(f"TAP key '{key}': range '{item}' ends before it starts; write {hi}-{lo}")
            ranges.append((lo, hi))
        return cls(tuple(ranges))

    @classmethod
    def of(cls, key: str, value) -> "IntSet":
        """From a TAP string, an int, or an iterable of ints (the Python side of configure)."""
        if isinstance(value, IntSet):
            return value
        if isinstance(value, bool):
            raise TapConfigError(f"TAP key '{key}': expected integers, got {value!r}")
        if isinstance(value, int):
            return cls(((value, value),))
        if isinstance(value, str):
            return cls.parse(key, value)
        if isinstance(value, range) and value.step == 1 and len(value):
            return cls(((value.start, value.stop - 1),))
        try:
            values = [int(v) for v in value]
        except (TypeError, ValueError):
            raise TapConfigError(f"TAP key '{key}': expected integers or ranges, got {value!r}") from None
        return cls(tuple((v, v) for v in values))


@dataclass(frozen=True)
class Filter:
    """Which records to keep: one filter type, used by capture and by the reader alike.

    `None` in a field means 'all'. A record that lacks a field that is filtered on
    (say, no step in its scope while `steps=` is set) is not kept.
    """

    layers: IntSet | None = None
    steps: IntSet | None = None
    ranks: IntSet | None = None
    points: frozenset[str] | None = None
    roles: frozenset[str] | None = None

    def keeps(self, point: str, layer, step, rank, role) -> bool:
        return self.keeps_point(point, layer) and self.keeps_forward(step, rank, role)

    def keeps_point(self, point: str, layer) -> bool:
        """The per-name part of the verdict (cacheable per tap-point name)."""
        if self.points is not None and point not in self.points:
            return False
        if self.layers is not None and (layer is None or layer not in self.layers):
            return False
        return True

    def keeps_forward(self, step, rank, role) -> bool:
        """The per-scope part of the verdict (cacheable per scope)."""
        if self.roles is not None and role not in self.roles:
            return False
        if self.steps is not None and (step is None or step not in self.steps):
            return False
        if self.ranks is not None and (rank is None or rank not in self.ranks):
            return False
        return True
