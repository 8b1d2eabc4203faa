"""`mode=stats` on the device: the stats of a record computed with torch on the caller's stream.

The same definitions as the host side (tensortap.format.stats.compute), as small tensors ("parts")
that alone travel to the host; the writer turns them into the record's stats (format.stats.from_parts):

    "stats:scalars" f64 [4]  (nan, posinf, neginf, absmax)      float tensors: counts of NaN, +inf, -inf,
                                                                 absmax = max |x| over finite x (0 if none);
                                                                 integer tensors (not uint8/bool): (0, 0, 0, max |x|)
    "stats:norm"    f32 [T, H] norm[t, h] = sqrt(sum_d x[t, h, d]^2), summed in float64   head points [T, H, D]
    "stats:zeros"   i32 [T, H] zeros[t, h] = #{d : x[t, h, d] == 0}                      head points
    "stats:valid"   i32 [T]    valid[t] = #{k : idx[t, k] >= 0}                           index points [T, K]
    "stats:hash"    i64 [1]    sum_i bits_i * ((i mod 65521) + 1), wrapping mod 2^64      row points
                               (bits: the elements viewed as signed integers of their width, C order)

Every operation is a fixed-shape torch kernel with no host sync, so the same code runs eagerly and
inside CUDA-graph capture (the parts then land in the graph's static slots).
"""

from __future__ import annotations

import torch

from tensortap import vocab

HASH_MODULUS = 65521
_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NO_ABSMAX = (torch.uint8, torch.bool)
_weights: dict[torch.device, torch.Tensor] = {}  # the longest weight vector made per device
_bounds_cache: dict = {}


def parts(tensor: torch.Tensor, point: str) -> dict[str, torch.Tensor]:
    """The stats parts of `tensor` at tap point `point` (see the module docstring), on its device.
    Few kernels a point: the eager caller pays one launch each; a graph replays them."""
    out: dict[str, torch.Tensor] = {}
    if point in vocab.ROW_POINTS:
        out["stats:hash"] = consensus_hash(tensor)  # [1]
    if tensor.numel() == 0:
        return out
    if tensor.is_floating_point():
        x = tensor.float() if tensor.element_size() == 1 else tensor  # float8 -> float32, exact
        out["stats:scalars"] = float_scalars(x)  # [4]
        if point in vocab.HEAD_POINTS and x.dim() == 3:
            out["stats:norm"] = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64).float()  # [T, H]
            out["stats:zeros"] = (x == 0).sum(dim=-1, dtype=torch.int32)  # [T, H]
    elif tensor.dtype not in _NO_ABSMAX:
        absmax = tensor.abs().max().to(torch.float64).view(1)  # [1]
        out["stats:scalars"] = torch.nn.functional.pad(absmax, (3, 0))  # [4] = (0, 0, 0, absmax)
        if point in vocab.INDEX_POINTS and tensor.dim() == 2:
            out["stats:valid"] = (tensor >= 0).sum(dim=-1, dtype=torch.int32)  # [T]
    return out


def float_scalars(x: torch.Tensor) -> torch.Tensor:
    """(nan, posinf, neginf, absmax over finite values) of a float tensor, as f64 [4].

    bucket(x) = #{b in (-inf, max finite, +inf) : b < x}: 0 for -inf, 1 finite, 2 +inf, 3 NaN (no
    comparison holds); one histogram of the buckets counts all three at once."""
    if x.element_size() == 1:  # float8: no infinity to compare with; float32 holds every value exactly
        x = x.float()  # [...]
    buckets = torch.bucketize(x, _bounds(x.dtype, x.device))  # [...] in 0..3
    counts = torch.histc(buckets.to(torch.float64), bins=4, min=0, max=3)  # [4]: -inf, finite, +inf, NaN
    absmax = torch.nan_to_num(x.abs(), nan=0.0, posinf=0.0).amax().to(torch.float64)  # []: finite values only
    return torch.stack([counts[3], counts[2], counts[0], absmax])  # [4]


def _bounds(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(-inf, largest finite, +inf) in `dtype` on `device` [3], made by kernels (no host copy: a graph
    capture may be in progress) and cached outside captures."""
    key = (dtype, torch.device(device))
    b = _bounds_cache.get(key)
    if b is None:
        b = torch.full((3,), float("inf"), dtype=dtype, device=device)  # [3]
        b[0:1].fill_(float("-inf"))  # fill kernels: an element assignment would copy from the host
        b[1:2].fill_(torch.finfo(dtype).max)
        if not (b.is_cuda and torch.cuda.is_current_stream_capturing()):
            _bounds_cache[key] = b
    return b


def consensus_hash(tensor: torch.Tensor) -> torch.Tensor:
    """hash = sum_i bits_i * w_i (int64, wrapping), w_i = (i mod 65521) + 1, as i64 [1].

    Equal bytes give equal hashes; A decides "bit-identical across the TP group" from it."""
    flat = tensor.contiguous().view(-1)  # [N]
    bits = flat.view(_SIGNED[flat.element_size()]).to(torch.int64)  # [N], sign-extended
    return (bits * hash_weights(flat.numel(), flat.device)).sum(dtype=torch.int64).view(1)  # [1]


def hash_weights(n: int, device: torch.device) -> torch.Tensor:
    """w [N] int64 = (arange(N) mod 65521) + 1: a prefix of one cached vector per device. Inside a
    CUDA-graph capture a missing vector is computed in the graph (the kernels replay with it)."""
    device = torch.device(device)
    w = _weights.get(device)
    if w is not None and w.numel() >= n:
        return w[:n]  # [N]
    fresh = torch.arange(n, dtype=torch.int64, device=device).remainder_(HASH_MODULUS).add_(1)  # [N]
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _weights[device] = fresh  # a capture's tensor would hold its values only after a replay
    return fresh


def host_hash(array) -> int:
    """The same hash of a numpy array (for tests and host-side callers): a Python int."""
    import numpy as np

    flat = np.ascontiguousarray(array).reshape(-1)  # [N]
    bits = flat.view({1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}[flat.itemsize]).astype(np.int64)  # [N]
    w = (np.arange(flat.size, dtype=np.int64) % HASH_MODULUS) + 1  # [N]
    with np.errstate(over="ignore"):
        return int((bits * w).sum(dtype=np.int64))
