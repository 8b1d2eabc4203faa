"""Capture-time stats: what every record carries, and what `mode=stats` writes instead of the tensor.

Computed in numpy from the stored array (raw bits decoded exactly), by whichever process writes
the segment, never on the caller's thread; or on the device (capture/device_stats.py) as small
"parts" that `from_parts` turns into exactly the same result. No h5py and no torch here.

    float tensors    nan, posinf, neginf, nonfinite, absmax (over finite values; 0 if none)
    int tensors      absmax (raw uint8 bytes and bool masks: none)
    [T, H, D] heads  norm[t, h] = ||x[t, h, :]||_2 (float64 sum, stored float32),
                     zeros[t, h] = #{d : x[t, h, d] == 0},
                     zero_heads = #{h : norm[t, h] == 0 for all t}
    [T, K] indices   valid[t] = #{k : idx[t, k] >= 0},  empty_rows = #{t : valid[t] == 0}
    [T, W] rows      hash = sum_i bits_i * w_i  mod 2^64 (as a signed int64), w_i = (i mod 65521) + 1,
                     bits = the stored elements viewed as signed integers of their width, C order

Full mode needs only the scalars, so they come from the raw bits: for IEEE-like formats the
unsigned value of (bits & ~sign) orders magnitudes, codes at or above the format's infinity are
inf/NaN, and a head is all-zero iff max(bits & ~sign) over it is 0 (for every type but float64 this
is exactly norm == 0: the square of the smallest subnormal is still > 0 in float64). float64 heads
and stats mode use the norm itself.
"""

from __future__ import annotations

import numpy as np

from tensortap import vocab
from tensortap.format import schema
from tensortap.format.codecs import FLOAT_NAMES, FP8_VALUES, STORED, to_float

HASH_MODULUS = 65521
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
_HASH_WEIGHTS = np.arange(1, HASH_MODULUS + 1, dtype=np.int64)  # [65521]: w_i for i in one period

# dtype -> (unsigned view, magnitude mask, code of +inf (None: no inf), first NaN code)
_BITS = {
    "bfloat16": (np.uint16, 0x7FFF, 0x7F80, 0x7F81),
    "float16": (np.uint16, 0x7FFF, 0x7C00, 0x7C01),
    "float32": (np.uint32, 0x7FFFFFFF, 0x7F800000, 0x7F800001),
    "float64": (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000, 0x7FF0000000000001),
    "float8_e5m2": (np.uint8, 0x7F, 0x7C, 0x7D),
    "float8_e4m3fn": (np.uint8, 0x7F, None, 0x7F),
}
_SIGN = {"bfloat16": 0x8000, "float16": 0x8000, "float32": 0x80000000, "float64": 0x8000000000000000,
         "float8_e5m2": 0x80, "float8_e4m3fn": 0x80}


def compute(array: np.ndarray, dtype: str, point: str, keep_arrays: bool) -> tuple[dict, np.ndarray | None]:
    """(scalar stats, stats array) of a stored array. The array (head norms and zero counts, or
    valid indices per row) is returned when `keep_arrays` (stats mode) or for index points."""
    scalars: dict = {"nonfinite": 0}
    if point in vocab.ROW_POINTS:
        scalars["hash"] = consensus_hash(array)
    if dtype in FLOAT_NAMES:
        return _float_stats(array, dtype, point, keep_arrays, scalars)
    if dtype in ("uint8", "bool") or array.size == 0:
        return scalars, None
    scalars["absmax"] = float(max(-int(array.min()), int(array.max())))  # Python ints: no overflow
    if point in vocab.INDEX_POINTS and array.ndim == 2:
        valid = (array >= 0).sum(axis=-1, dtype=np.int32).astype(schema.ROW_STATS_DTYPE)  # [T]
        scalars["empty_rows"] = int((valid == 0).sum())
        return scalars, valid
    return scalars, None


def _float_stats(array, dtype, point, keep_arrays, scalars):
    if array.size == 0:
        return scalars, None
    unsigned, mask, inf, first_nan = _BITS[dtype]
    heads = point in vocab.HEAD_POINTS and array.ndim == 3
    magnitude = array.view(unsigned) & unsigned(mask)  # [...], |x| as ordered integer codes
    if heads and not keep_arrays and dtype != "float64":
        per_head = magnitude.max(axis=2)  # [T, H]
        scalars["zero_heads"] = int((per_head.max(axis=0) == 0).sum())
        top = int(per_head.max())
    else:
        top = int(magnitude.max())
    limit = inf if inf is not None else first_nan  # codes at or above it are inf or NaN
    if top >= limit:
        nan = int((magnitude >= first_nan).sum())
        posinf = int((array.view(unsigned) == unsigned(inf)).sum()) if inf is not None else 0
        neginf = int((magnitude == unsigned(inf)).sum()) - posinf if inf is not None else 0
        scalars.update(nan=nan, posinf=posinf, neginf=neginf, nonfinite=nan + posinf + neginf)
        finite = magnitude[magnitude < unsigned(limit)]  # [n finite]
        top = int(finite.max()) if finite.size else 0
    scalars["absmax"] = _decode(top, dtype)
    if heads and (keep_arrays or dtype == "float64"):
        x = to_float(array, dtype, np.float32) if dtype != "float64" else array  # [T, H, D], exact
        norm = np.sqrt(np.einsum("thd,thd->th", x, x, dtype=np.float64)).astype(np.float32)  # [T, H]
        scalars["zero_heads"] = int((norm == 0).all(axis=0).sum())
        if keep_arrays:
            stats = np.empty(norm.shape, dtype=schema.HEAD_STATS_DTYPE)  # [T, H]
            stats["norm"] = norm
            stats["zeros"] = (x == 0).sum(axis=-1, dtype=np.int32)  # [T, H]
            return scalars, stats
    return scalars, None


def _decode(code: int, dtype: str) -> float:
    """The float value of a non-negative magnitude code of `dtype`."""
    if dtype == "bfloat16":  # the top half of a float32
        return float(np.array([code << 16], dtype=np.uint32).view(np.float32)[0])
    if dtype in FP8_VALUES:
        return float(FP8_VALUES[dtype][code])
    return float(np.array([code], dtype=_BITS[dtype][0]).view(STORED[dtype][0])[0])


def consensus_hash(array: np.ndarray) -> int:
    """sum_i bits_i * ((i mod 65521) + 1) in int64 with wrap-around, as a Python int (signed).

    Summed one 65521-element period at a time: a period's dot product with the weight vector,
    then the periods' sum, all in int64 (numpy integer arithmetic wraps mod 2^64)."""
    flat = np.ascontiguousarray(array).reshape(-1)  # [N]
    if flat.size == 0:
        return 0
    bits = flat.view(_SIGNED[flat.itemsize])  # [N], the stored bytes as signed integers
    full, rest = divmod(flat.size, HASH_MODULUS)
    with np.errstate(over="ignore"):
        total = np.int64(0)
        if full:
            periods = bits[: full * HASH_MODULUS].reshape(full, HASH_MODULUS).astype(np.int64)  # [P, 65521]
            total = (periods @ _HASH_WEIGHTS).sum(dtype=np.int64)  # [P] -> []
        if rest:
            total = total + np.dot(bits[full * HASH_MODULUS:].astype(np.int64), _HASH_WEIGHTS[:rest])
    return int(np.int64(total))


def from_parts(parts: dict, dtype: str, point: str, shape: list) -> tuple[dict, np.ndarray | None]:
    """What `compute(array, dtype, point, keep_arrays=True)` returns for the tensor the device parts
    were computed from (capture/device_stats.py): "stats:scalars" f64 [4] = (nan, posinf, neginf,
    absmax), "stats:norm" f32 [T, H], "stats:zeros" i32 [T, H], "stats:valid" i32 [T], "stats:hash"
    i64 [1], each present only where defined."""
    scalars: dict = {"nonfinite": 0}
    hashed = parts.get("stats:hash")
    if point in vocab.ROW_POINTS:
        scalars["hash"] = int(np.asarray(hashed).reshape(-1)[0]) if hashed is not None else 0
    size = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    if size == 0 or (dtype in ("uint8", "bool")):
        return scalars, None
    values = parts.get("stats:scalars")
    if values is not None:
        nan, posinf, neginf, absmax = (float(v) for v in np.asarray(values, dtype=np.float64).reshape(4))  # [4]
        if dtype in FLOAT_NAMES and nan + posinf + neginf > 0:
            scalars.update(nan=int(nan), posinf=int(posinf), neginf=int(neginf),
                           nonfinite=int(nan) + int(posinf) + int(neginf))
        scalars["absmax"] = absmax
    if dtype in FLOAT_NAMES:
        norm, zeros = parts.get("stats:norm"), parts.get("stats:zeros")
        if point in vocab.HEAD_POINTS and len(shape) == 3 and norm is not None and zeros is not None:
            norm = np.asarray(norm, dtype=np.float32)  # [T, H]
            scalars["zero_heads"] = int((norm == 0).all(axis=0).sum())
            stats = np.empty(norm.shape, dtype=schema.HEAD_STATS_DTYPE)  # [T, H]
            stats["norm"] = norm
            stats["zeros"] = np.asarray(zeros, dtype=np.int32)  # [T, H]
            return scalars, stats
        return scalars, None
    valid = parts.get("stats:valid")
    if point in vocab.INDEX_POINTS and len(shape) == 2 and valid is not None:
        valid = np.asarray(valid).astype(schema.ROW_STATS_DTYPE)  # [T]
        scalars["empty_rows"] = int((valid == 0).sum())
        return scalars, valid
    return scalars, None
