"""Dtype codecs: torch tensors to the numpy arrays stored on disk, and back, bit for bit.

numpy has no bfloat16 or float8, so those are stored as their raw bits (uint16 / uint8)
with a `dtype` attribute naming what the bits are. Decoding to float32/float64 is exact:
every bfloat16 and float8 value is representable in float32.
"""

from __future__ import annotations

import numpy as np

# dtype name -> (stored numpy dtype, is raw bits)
STORED = {
    "bfloat16": (np.dtype("<u2"), True),
    "float8_e4m3fn": (np.dtype("u1"), True),
    "float8_e5m2": (np.dtype("u1"), True),
    "float16": (np.dtype("<f2"), False),
    "float32": (np.dtype("<f4"), False),
    "float64": (np.dtype("<f8"), False),
    "int8": (np.dtype("i1"), False),
    "int16": (np.dtype("<i2"), False),
    "int32": (np.dtype("<i4"), False),
    "int64": (np.dtype("<i8"), False),
    "uint8": (np.dtype("u1"), False),
    "bool": (np.dtype("?"), False),
}
RAW_BITS = {"bfloat16": "int16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}
FLOAT_NAMES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float16", "float32", "float64")


def dtype_name(dtype) -> str:
    """'torch.bfloat16' / np.float32 / 'float32' -> 'bfloat16' / 'float32' / 'float32'."""
    name = str(dtype).removeprefix("torch.")
    if name not in STORED:
        raise TypeError(f"tensortap cannot store dtype {dtype}; supported: {', '.join(STORED)}")
    return name


def encode(tensor) -> tuple[np.ndarray, str]:
    """A contiguous CPU torch tensor -> (array to store, dtype name). Shares memory, copies nothing."""
    import torch

    name = dtype_name(tensor.dtype)
    if name in RAW_BITS:
        bits = tensor.view(getattr(torch, RAW_BITS[name]))
        return bits.numpy().view(STORED[name][0]), name
    return tensor.numpy(), name


def to_torch(array: np.ndarray, name: str):
    """Stored array + dtype name -> torch tensor in the original dtype (bit-exact)."""
    import torch

    if name in RAW_BITS:
        raw = _contiguous(array).view(np.int16 if name == "bfloat16" else np.uint8)
        return torch.from_numpy(raw).view(getattr(torch, name))
    return torch.from_numpy(_contiguous(array))


def _contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)."""
    return array if array.flags.c_contiguous else array.copy(order="C")


def _fp8_table(exp_bits: int, man_bits: int, bias: int, has_inf: bool) -> np.ndarray:
    """float64 value of each of the 256 float8 codes, computed from the format's fields."""
    codes = np.arange(256)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    man = codes & ((1 << man_bits) - 1)
    normal = sign * (1.0 + man / (1 << man_bits)) * np.exp2(exp - bias)
    subnormal = sign * (man / (1 << man_bits)) * np.exp2(1 - bias)
    values = np.where(exp == 0, subnormal, normal)
    top = exp == (1 << exp_bits) - 1
    if has_inf:  # e5m2: IEEE-like, inf at mantissa 0, NaN otherwise
        values = np.where(top & (man == 0), sign * np.inf, values)
        values = np.where(top & (man != 0), np.nan, values)
    else:  # e4m3fn: no inf, NaN only at S.1111.111
        values = np.where(top & (man == (1 << man_bits) - 1), np.nan, values)
    return values


FP8_VALUES = {
    "float8_e4m3fn": _fp8_table(4, 3, 7, has_inf=False),
    "float8_e5m2": _fp8_table(5, 2, 15, has_inf=True),
}


def to_float(array: np.ndarray, name: str, dtype=np.float64) -> np.ndarray:
    """Stored array -> exact float values (float64 by default; float32 is also exact for 16/8-bit types)."""
    if name == "bfloat16":
        bits = array.astype(np.uint32) << 16  # bf16 is the top half of a float32
        with np.errstate(invalid="ignore"):  # signalling-NaN payloads stay NaN
            return bits.view(np.float32).astype(dtype, copy=False)
    if name in FP8_VALUES:
        return FP8_VALUES[name][array].astype(dtype, copy=False)
    return array.astype(dtype, copy=False)


def to_numpy(array: np.ndarray, name: str) -> np.ndarray:
    """Stored array -> the closest numpy array: native dtype, or an exact float32 upcast for bf16/fp8."""
    if name in RAW_BITS:
        return to_float(array, name, np.float32)
    return array
