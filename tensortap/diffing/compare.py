"""Metrics of one tensor pair: values, index sets, or raw cache bytes.

values   max abs diff (and where), max rel diff, relative L2 ||a - b|| / ||b||, cosine, and the count
         of rows (last axis) over tolerance (tolerances.py: by norm; NaN against a number counts,
         NaN against NaN does not)
indices  per row, the sets of ids >= 0 (order and -1 padding ignored): Jaccard and rows that differ
bytes    fp8_ds_mla cache rows compared byte for byte: the tokens (656-byte rows) that differ are
         counted; they count as different only when, dequantised, they are off by more than the
         fp8 tolerance (a run with bf16 rounding differences re-quantises a few values one step apart)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from tensortap.tolerances import Tolerance, tolerance


@dataclass
class Comparison:
    kind: str  # values | indices | bytes | shape | dtype
    equal: bool
    shape_a: tuple = ()
    shape_b: tuple = ()
    dtype_a: str = ""
    dtype_b: str = ""
    total: int = 0
    over: int = 0  # rows over tolerance (values: last axis; indices: rows; bytes: tokens)
    max_abs: float = 0.0
    max_abs_at: list = field(default_factory=list)
    value_a: float | None = None
    value_b: float | None = None
    max_rel: float = 0.0
    rel_l2: float = 0.0
    cosine: float = 1.0
    jaccard: float = 1.0  # smallest per-row Jaccard (indices)
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def compare_values(a: np.ndarray, b: np.ndarray, tol: Tolerance, dtype_a: str = "", dtype_b: str = "") -> Comparison:
    """a, b float64 of one shape."""
    c = Comparison("values", True, a.shape, b.shape, dtype_a, dtype_b)
    if a.size == 0:
        return c
    same = (a == b) | (np.isnan(a) & np.isnan(b))  # [...]: equal infinities and NaN against NaN match
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - b))  # [...]
    diff = np.where(np.isnan(diff), np.inf, diff)
    over = tol.row_excess(a, b) > 0  # [rows]
    c.total, c.over = int(over.size), int(over.sum())
    c.equal = c.over == 0
    flat = int(np.argmax(diff))
    c.max_abs = float(diff.flat[flat])
    c.max_abs_at = [int(i) for i in np.unravel_index(flat, a.shape)]
    c.value_a, c.value_b = float(a.flat[flat]), float(b.flat[flat])
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(same, 0.0, diff / np.abs(b))
        rel = np.where(np.isnan(rel), np.inf, rel)
        finite = np.isfinite(a) & np.isfinite(b)
        fa, fb = np.where(finite, a, 0.0), np.where(finite, b, 0.0)
        norm_b, norm_a = float(np.linalg.norm(fb)), float(np.linalg.norm(fa))
        c.max_rel = float(rel.max())
        c.rel_l2 = float(np.linalg.norm(fa - fb) / norm_b) if norm_b else (0.0 if norm_a == 0 else float("inf"))
        c.cosine = float(np.dot(fa.ravel(), fb.ravel()) / (norm_a * norm_b)) if norm_a and norm_b else float(norm_a == norm_b)
    return c


def compare_indices(a: np.ndarray, b: np.ndarray) -> Comparison:
    """a, b [T, K] integer ids; rows compared as sets of ids >= 0."""
    c = Comparison("indices", True, a.shape, b.shape, total=int(a.shape[0]) if a.ndim else 1)
    rows_a, rows_b = np.atleast_2d(a), np.atleast_2d(b)
    worst = 1.0
    for t, (ra, rb) in enumerate(zip(rows_a, rows_b)):
        sa, sb = set(ra[ra >= 0].tolist()), set(rb[rb >= 0].tolist())
        union = sa | sb
        jaccard = len(sa & sb) / len(union) if union else 1.0
        if sa != sb:
            c.over += 1
            if not c.max_abs_at:
                c.max_abs_at = [t]
                c.note = f"row {t}: {len(sa - sb)} ids only in A, {len(sb - sa)} only in B"
        worst = min(worst, jaccard)
    c.jaccard = worst
    c.equal = c.over == 0
    return c


def compare_bytes(a: np.ndarray, b: np.ndarray) -> Comparison:
    """a, b [..., 656] uint8 fp8_ds_mla token rows (cache pages or tokens): byte-wise, then dequantised."""
    from tensortap.analysis.oracle import TOKEN_BYTES, dequantize

    c = Comparison("bytes", True, a.shape, b.shape, "uint8", "uint8")
    rows_a, rows_b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])  # [N, 656]
    differ = (rows_a != rows_b).any(axis=1)  # [N]
    c.total = int(differ.size)
    c.over = int(differ.sum())
    if c.over:
        first = int(np.flatnonzero(differ)[0])
        c.max_abs_at = [int(i) for i in np.unravel_index(first, a.shape[:-1])]
        c.note = f"{c.over} of {c.total} tokens differ ({int((rows_a != rows_b).sum())} bytes)"
        if a.shape[-1] == TOKEN_BYTES:
            off = tolerance("float8_e4m3fn").row_excess(dequantize(rows_a[differ]), dequantize(rows_b[differ])) > 0
            c.equal = not off.any()
            c.note += f"; {int(off.sum())} of them beyond the fp8 tolerance once dequantised"
        else:
            c.equal = False
    return c


def shape_mismatch(shape_a: tuple, shape_b: tuple, dtype_a: str, dtype_b: str) -> Comparison:
    kind = "shape" if tuple(shape_a) != tuple(shape_b) else "dtype"
    note = (f"shape {list(shape_a)} vs {list(shape_b)}" if kind == "shape" else f"dtype {dtype_a} vs {dtype_b}")
    return Comparison(kind, False, tuple(shape_a), tuple(shape_b), dtype_a, dtype_b, note=note)
