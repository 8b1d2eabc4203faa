"""Tolerances per dtype, written once: the reference tests, the analyzer and diff all use these.

A value a passes against a reference b when, elementwise, |a - b| <= atol + rtol * |b|.
Each rtol sits a few units of the dtype's rounding (eps) above what one decode layer
accumulates when it computes in that dtype and is compared with a float64 recompute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float

    def excess(self, actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
        """|a - b| - (atol + rtol * |b|): > 0 where over tolerance. Equal values (infinities too) never are;
        NaN against anything else always is."""
        with np.errstate(invalid="ignore"):
            diff = np.abs(actual - expected) - (self.atol + self.rtol * np.abs(expected))
        diff = np.where(np.isnan(diff), np.inf, diff)
        return np.where(actual == expected, -np.inf, diff)

    def allclose(self, actual: np.ndarray, expected: np.ndarray) -> bool:
        return bool((self.excess(np.asarray(actual, np.float64), np.asarray(expected, np.float64)) <= 0).all())


TOLERANCES = {
    "float64": Tolerance(rtol=1e-9, atol=1e-12),
    "float32": Tolerance(rtol=1e-4, atol=1e-5),
    "float16": Tolerance(rtol=4e-3, atol=1e-4),
    "bfloat16": Tolerance(rtol=3e-2, atol=1e-3),
    "float8_e4m3fn": Tolerance(rtol=1.25e-1, atol=1e-2),
    "float8_e5m2": Tolerance(rtol=2.5e-1, atol=1e-2),
}
EXACT = Tolerance(rtol=0.0, atol=0.0)  # integers, indices, raw bytes


def tolerance(dtype) -> Tolerance:
    """Tolerance of a dtype name ('bfloat16'), torch dtype or numpy dtype; exact for integers."""
    name = str(dtype).removeprefix("torch.")
    return TOLERANCES.get(name, EXACT)
