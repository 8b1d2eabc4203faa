"""The TAP grammar, parsed once into a frozen `TapConfig`.

    TAP="<dir>[;key=value]..."
    TAP="/scratch/tap;layers=0,78;steps=100-140;roles=draft;points=q,topk,lse"

Unset, empty or ``0`` means disabled. Every key is also accepted by
`tensortap.configure(**keys)`. An unknown key or a malformed value raises
`TapConfigError` with one line that names it and lists what is valid.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from tensortap.errors import TapConfigError
from tensortap.vocab import POINTS, ROLES, Filter, IntSet  # noqa: F401  (re-exported: the TAP grammar's names)

MODES = ("full", "stats")
ON_FULL = ("block", "drop")
COMPRESSIONS = ("none", "lzf", "gzip")
WRITERS = ("process", "thread")
SWITCH = ("on", "off")
# Flight-recorder triggers (docs/flight-recorder.md), evaluated on each record's device stats.
TRIGGERS = ("zero-heads", "nonfinite", "empty-topk", "lse-nonfinite")

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class TapConfig:
    """A parsed TAP value. Frozen: the capture runtime reads it, never changes it."""

    dir: str
    filter: Filter = Filter()
    mode: str = "full"
    max_bytes: int | None = None
    on_full: str = "block"
    compress: str = "none"
    segment_records: int = 20_000
    segment_bytes: int = 2 << 30
    queue_bytes: int = 1 << 30
    writer: str = "process"
    trigger: frozenset = frozenset()  # TRIGGERS that arm the flight recorder; empty: off
    ring: int = 0  # steps of full tensors kept on the device before a trigger
    ring_bytes: int = 1 << 30
    trigger_steps: int = 8  # steps captured in full after a trigger
    graph_bytes: int = 2 << 30  # device memory for CUDA-graph slots
    checksum: bool = False  # a crc32 attribute per stored tensor, verified on read (docs/crash-safety.md)

    def to_json_dict(self) -> dict:
        f = self.filter
        return {
            "dir": self.dir,
            "layers": str(f.layers) if f.layers else None,
            "steps": str(f.steps) if f.steps else None,
            "ranks": str(f.ranks) if f.ranks else None,
            "points": sorted(f.points) if f.points is not None else None,
            "roles": sorted(f.roles) if f.roles is not None else None,
            "mode": self.mode,
            "max_bytes": self.max_bytes,
            "on_full": self.on_full,
            "compress": self.compress,
            "segment_records": self.segment_records,
            "segment_bytes": self.segment_bytes,
            "queue_bytes": self.queue_bytes,
            "writer": self.writer,
            "trigger": sorted(self.trigger) or None,
            "ring": self.ring,
            "ring_bytes": self.ring_bytes,
            "trigger_steps": self.trigger_steps,
            "graph_bytes": self.graph_bytes,
            "checksum": "on" if self.checksum else "off",
        }


VALID_KEYS = (
    "dir",
    "layers",
    "steps",
    "ranks",
    "points",
    "roles",
    "mode",
    "max_bytes",
    "on_full",
    "compress",
    "segment_records",
    "segment_bytes",
    "queue_bytes",
    "writer",
    "trigger",
    "ring",
    "ring_bytes",
    "trigger_steps",
    "graph_bytes",
    "checksum",
)


def parse_size(key: str, text) -> int:
    """'20G', '512M', '1.5G', '4096' -> bytes (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), flags=re.IGNORECASE)
        if not m:
            raise TapConfigError(f"TAP key '{key}': '{text}' is not a size; write e.g. {key}=20G, 512M or 4096")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise TapConfigError(f"TAP key '{key}': must be positive, got {text!r}")
    return value


def _names(key: str, value, valid: tuple[str, ...]) -> frozenset[str]:
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
    items = [s for s in items if s]
    if not items:
        raise TapConfigError(f"TAP key '{key}': empty list; valid values: {', '.join(valid)}")
    for item in items:
        if item not in valid:
            raise TapConfigError(f"TAP key '{key}': unknown value '{item}'; valid values: {', '.join(valid)}")
    return frozenset(items)


def _choice(key: str, value, valid: tuple[str, ...]) -> str:
    value = str(value).strip()
    if value not in valid:
        raise TapConfigError(f"TAP key '{key}': unknown value '{value}'; valid values: {', '.join(valid)}")
    return value


def from_mapping(keys: Mapping[str, object]) -> TapConfig:
    """Build a TapConfig from key/value pairs (strings from TAP, or Python values)."""
    unknown = [k for k in keys if k not in VALID_KEYS]
    if unknown:
        raise TapConfigError(f"unknown TAP key '{unknown[0]}'; valid keys: {', '.join(VALID_KEYS)}")
    directory = keys.get("dir")
    if directory is None or str(directory).strip() == "":
        raise TapConfigError("TAP has no directory; write TAP=/path/to/dir[;key=value...] or configure(dir=...)")
    ints = {k: IntSet.of(k, keys[k]) for k in ("layers", "steps", "ranks") if keys.get(k) is not None}
    flt = Filter(
        layers=ints.get("layers"),
        steps=ints.get("steps"),
        ranks=ints.get("ranks"),
        points=_names("points", keys["points"], POINTS) if keys.get("points") is not None else None,
        roles=_names("roles", keys["roles"], ROLES) if keys.get("roles") is not None else None,
    )
    config = TapConfig(dir=str(directory), filter=flt)
    changes: dict[str, object] = {}
    if keys.get("mode") is not None:
        changes["mode"] = _choice("mode", keys["mode"], MODES)
    if keys.get("on_full") is not None:
        changes["on_full"] = _choice("on_full", keys["on_full"], ON_FULL)
    if keys.get("compress") is not None:
        changes["compress"] = _choice("compress", keys["compress"], COMPRESSIONS)
    if keys.get("writer") is not None:
        changes["writer"] = _choice("writer", keys["writer"], WRITERS)
    if keys.get("checksum") is not None:
        value = keys["checksum"]
        text = ("on" if value else "off") if isinstance(value, bool) else str(value).strip().lower()
        changes["checksum"] = _choice("checksum", text, SWITCH) == "on"
    for key in ("max_bytes", "segment_bytes", "queue_bytes"):
        if keys.get(key) is not None:
            changes[key] = parse_size(key, keys[key])
    if keys.get("segment_records") is not None:
        changes["segment_records"] = parse_size("segment_records", keys["segment_records"])
    if keys.get("trigger") is not None:
        changes["trigger"] = _names("trigger", keys["trigger"], TRIGGERS)
    for key in ("ring_bytes", "graph_bytes"):
        if keys.get(key) is not None:
            changes[key] = parse_size(key, keys[key])
    for key in ("ring", "trigger_steps"):
        if keys.get(key) is not None:
            changes[key] = _count(key, keys[key])
    return dataclasses.replace(config, **changes)


def _count(key: str, value) -> int:
    """A non-negative step count (ring=4, trigger_steps=8)."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit():
        raise TapConfigError(f"TAP key '{key}': '{value}' is not a step count; write e.g. {key}=4")
    return int(text)


def parse_tap(value: str | None) -> TapConfig | None:
    """Parse a TAP value; None when the tap is disabled (unset, empty or '0')."""
    if value is None:
        return None
    value = value.strip()
    if value in ("", "0"):
        return None
    keys: dict[str, str] = {}
    for i, item in enumerate(value.split(";")):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            if i == 0:
                keys["dir"] = item
                continue
            raise TapConfigError(
                f"TAP item '{item}' is not key=value; valid keys: {', '.join(VALID_KEYS)}"
            )
        key, _, val = item.partition("=")
        key = key.strip()
        if key in keys:
            raise TapConfigError(f"TAP key '{key}' is given twice; keep one")
        keys[key] = val.strip()
    return from_mapping(keys)


def filter_from(
    layers=None, steps=None, ranks=None, points: Iterable[str] | str | None = None, roles=None
) -> Filter:
    """The same filter from Python values, for the reader (points and roles are not restricted)."""
    def names(v):
        if v is None:
            return None
        return frozenset([v] if isinstance(v, str) else v)

    return Filter(
        layers=IntSet.of("layers", layers) if layers is not None else None,
        steps=IntSet.of("steps", steps) if steps is not None else None,
        ranks=IntSet.of("ranks", ranks) if ranks is not None else None,
        points=names(points),
        roles=names(roles),
    )
