"""Small text helpers shared by the reader, the writer, the analysis and the CLI: sizes, integer
spans, one-line errors and JSON conversion. No torch, no h5py."""

from __future__ import annotations

import numpy as np


def human_bytes(nbytes: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes} B"


def span(values: list) -> str:
    """[0, 1, 2, 3, 7] -> '0-3,7'."""
    if not values:
        return "-"
    if not all(isinstance(v, int) for v in values):
        return ",".join(map(str, values))
    parts, start, prev = [], values[0], values[0]
    for v in values[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)


def one_line(exc: BaseException) -> str:
    """'OSError: [Errno 28] No space left on device' on one line, whatever the message held."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def as_json(value):
    """Metadata and reports -> JSON-able Python (numpy scalars and arrays, tuples, sets; anything else as text)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple, set)):
        return [as_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): as_json(v) for k, v in value.items()}
    return str(value)
