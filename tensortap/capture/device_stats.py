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


def parts(tensor: torch.Tensor, point: str) -> dict[str, torch.Tensor]:
    """The stats parts of `tensor` at tap point `point` (see the module docstring), on its device."""
    out: dict[str, torch.Tensor] = {}
    if point in vocab.ROW_POINTS:
        out["stats:hash"] = consensus_hash(tensor)  # [1]
    if tensor.numel() == 0:
        return out
    if tensor.is_floating_point():
        x = tensor if tensor.dtype == torch.float64 else tensor.float()  # [...], exact for bf16/fp16/fp8
        out["stats:scalars"] = float_scalars(x)  # [4]
        if point in vocab.HEAD_POINTS and x.dim() == 3:
            out["stats:norm"] = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float64).float()  # [T, H]
            out["stats:zeros"] = (x == 0).sum(dim=-1, dtype=torch.int32)  # [T, H]
    elif tensor.dtype not in _NO_ABSMAX:
        absmax = tensor.abs().max().to(torch.float64)  # []
        out["stats:scalars"] = torch.cat([absmax.new_zeros(3), absmax.view(1)])  # [4]
        if point in vocab.INDEX_POINTS and tensor.dim() == 2:
            out["stats:valid"] = (tensor >= 0).sum(dim=-1, dtype=torch.int32)  # [T]
    return out


def float_scalars(x: torch.Tensor) -> torch.Tensor:
    """(nan, posinf, neginf, absmax over finite values) of a float32/float64 tensor, as f64 [4]."""
    a = x.abs()  # [...]; NaN stays NaN, -inf becomes +inf
    nan = torch.isnan(x).sum()  # []
    inf = a == float("inf")  # [...]
    posinf = (inf & (x > 0)).sum()  # []
    neginf = inf.sum() - posinf  # []
    finite_abs = torch.where(torch.isfinite(x), a, torch.zeros((), dtype=x.dtype, device=x.device))  # [...]
    counts = torch.stack([nan, posinf, neginf]).to(torch.float64)  # [3]
    return torch.cat([counts, finite_abs.max().to(torch.float64).view(1)])  # [4]


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
