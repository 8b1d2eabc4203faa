"""Capture-time stats: what every record carries, and what `mode=stats` writes instead of the tensor.

Computed in numpy from the stored array (raw bits decoded exactly), by whichever process
writes the segment, never on the caller's thread:

    float tensors    nan, posinf, neginf, nonfinite, absmax (over finite values)
    int tensors      absmax (raw uint8 bytes and bool masks: none)
    [T, H, D] heads  norm[t, h] = ||x[t, h, :]||_2, zeros[t, h] = #{d : x[t, h, d] == 0}
                     zero_heads = #{h : norm[:, h] == 0}  (a head is all-zero iff its norm is 0)
    [T, K] indices   valid[t] = #{k : idx[t, k] >= 0},  empty_rows = #{t : valid[t] == 0}
"""

from __future__ import annotations

import numpy as np

from tensortap.format import schema
from tensortap.format.codecs import FLOAT_NAMES, to_float


def compute(array: np.ndarray, dtype: str, point: str, keep_arrays: bool) -> tuple[dict, np.ndarray | None]:
    """(scalar stats, stats array) of a stored array. The array (head norms and zero counts, or
    valid indices per row) is returned when `keep_arrays` (stats mode) or for index points."""
    scalars: dict = {"nonfinite": 0}
    if dtype in FLOAT_NAMES:
        return _float_stats(array, dtype, point, keep_arrays, scalars)
    if dtype in ("uint8", "bool") or array.size == 0:
        return scalars, None
    scalars["absmax"] = float(np.abs(array.astype(np.int64, copy=False)).max())
    if point in schema.INDEX_POINTS and array.ndim == 2:
        valid = (array >= 0).sum(axis=-1, dtype=np.int32).astype(schema.ROW_STATS_DTYPE)  # [T]
        scalars["empty_rows"] = int((valid == 0).sum())
        return scalars, valid
    return scalars, None


def _float_stats(array, dtype, point, keep_arrays, scalars):
    x = to_float(array, dtype, np.float32) if dtype != "float64" else array  # [...], exact
    if x.size == 0:
        return scalars, None
    with np.errstate(invalid="ignore", over="ignore"):
        absmax = max(-float(x.min()), float(x.max()))  # NaN/inf propagate
        if not np.isfinite(absmax):
            nan, posinf, neginf = int(np.isnan(x).sum()), int(np.isposinf(x).sum()), int(np.isneginf(x).sum())
            scalars.update(nan=nan, posinf=posinf, neginf=neginf, nonfinite=nan + posinf + neginf)
            finite = np.abs(x[np.isfinite(x)])
            absmax = float(finite.max()) if finite.size else 0.0
        scalars["absmax"] = absmax
        if point in schema.HEAD_POINTS and x.ndim == 3:
            norm = np.sqrt(np.einsum("thd,thd->th", x, x, dtype=np.float64)).astype(np.float32)  # [T, H]
            scalars["zero_heads"] = int((norm == 0).all(axis=0).sum())
            if keep_arrays:
                stats = np.empty(norm.shape, dtype=schema.HEAD_STATS_DTYPE)
                stats["norm"] = norm
                stats["zeros"] = (x == 0).sum(axis=-1, dtype=np.int32)  # [T, H]
                return scalars, stats
    return scalars, None
