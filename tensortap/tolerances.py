"""Tolerances per dtype, written once: the reference tests, the analyzer and diff all use these.

Outputs are compared row by row (a row: the last axis, e.g. one head's 512 values for one
token), by norm:

    ||a - b|| <= atol * sqrt(n) + rtol * ||b||        (n: the row's length)

A row of an attention output is a weighted sum; where large partials cancel, single elements
carry rounding far above their own size, so an elementwise test would fail on correct bf16
runs. Equal rows (infinities included) always pass; NaN against anything else never does.
Each rtol sits a few units of the dtype's rounding above what one decode layer accumulates
in that dtype against a float64 recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float

    def row_excess(self, actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
        """Per row (all axes but the last): ||a - b|| - (atol sqrt(n) + rtol ||b||); > 0 is over tolerance."""
        actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
        if actual.ndim == 0:
            actual, expected = actual.reshape(1), expected.reshape(1)
        same = (actual == expected) | (np.isnan(actual) & np.isnan(expected))  # [..., n]
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.where(same, 0.0, actual - expected)  # [..., n]
            error = np.sqrt(np.sum(diff * diff, axis=-1))  # [...]
            finite = np.where(np.isfinite(expected), expected, 0.0)
            size = np.sqrt(np.sum(finite * finite, axis=-1))  # [...]
            excess = error - (self.atol * np.sqrt(actual.shape[-1]) + self.rtol * size)
        return np.where(np.isnan(excess), np.inf, excess)  # [...]

    def allclose(self, actual: np.ndarray, expected: np.ndarray) -> bool:
        return bool((self.row_excess(actual, expected) <= 0).all())


TOLERANCES = {
    "float64": Tolerance(rtol=1e-9, atol=1e-12),
    "float32": Tolerance(rtol=1e-4, atol=1e-6),
    "float16": Tolerance(rtol=4e-3, atol=1e-5),
    "bfloat16": Tolerance(rtol=3e-2, atol=1e-4),
    "float8_e4m3fn": Tolerance(rtol=1.25e-1, atol=1e-3),
    "float8_e5m2": Tolerance(rtol=2.5e-1, atol=1e-3),
}
EXACT = Tolerance(rtol=0.0, atol=0.0)  # integers, indices, raw bytes


def tolerance(dtype) -> Tolerance:
    """Tolerance of a dtype name ('bfloat16'), torch dtype or numpy dtype; exact for integers."""
    name = str(dtype).removeprefix("torch.")
    return TOLERANCES.get(name, EXACT)


def looser(*dtypes) -> Tolerance:
    """The tolerance of the least precise of several dtypes (comparing a bf16 run with a float32 one)."""
    return max((tolerance(d) for d in dtypes), key=lambda t: t.rtol)
