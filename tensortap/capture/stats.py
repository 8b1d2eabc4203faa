"""Capture-time stats: what `mode=stats` writes instead of the tensor, and what every record carries.

Computed with torch on whatever device the tensor is on, so that stats mode on a GPU
moves a few small tensors to the host instead of the whole record:

    float tensors    nan, posinf, neginf, nonfinite, absmax (over finite values)
    int tensors      absmax (raw uint8 bytes and bool masks: none)
    [T, H, D] heads  norm[t, h] = ||x[t, h, :]||_2 (float32), zeros[t, h] = #{d : x[t, h, d] == 0}
                     zero_heads = #{h : norm[:, h] == 0}  (a head is all-zero iff its norm is 0)
    [T, K] indices   valid[t] = #{k : idx[t, k] >= 0},  empty_rows = #{t : valid[t] == 0}
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tensortap.format import schema


def device_stats(tensor: torch.Tensor, point: str, may_sync: bool = False, zero_counts: bool = True) -> dict[str, torch.Tensor]:
    """Stats as small tensors on the tensor's own device.

    `may_sync`: the tensor is on the host (or a sync is acceptable), so the exact NaN/inf
    counts are computed only when the absmax shows that there are any. `zero_counts=False`
    skips the per-(token, head) exact-zero counts (full mode stores the tensor itself; a
    head is all-zero exactly when its norm is 0). Raw bytes (uint8, bool) get no stats.
    """
    out: dict[str, torch.Tensor] = {}
    x = tensor.detach()
    if x.dtype.is_floating_point:
        xf = x if x.dtype == torch.float32 else x.float()  # [...] exact upcast of bf16/fp16/fp8
        if xf.numel():
            low, high = torch.aminmax(xf)  # one pass; NaN/inf propagate
            absmax = torch.maximum(-low, high)
        else:
            absmax = torch.zeros((), device=x.device)
        if point in schema.HEAD_POINTS and xf.dim() == 3:
            out["head_norm"] = torch.linalg.vector_norm(xf, dim=-1)  # [T, H]
            if zero_counts:
                out["head_zeros"] = (xf == 0).sum(dim=-1, dtype=torch.int32)  # [T, H]
        if may_sync and math.isfinite(float(absmax)):
            out["absmax"] = absmax
            return out
        nan, posinf, neginf = torch.isnan(xf), torch.isposinf(xf), torch.isneginf(xf)
        out["nan"], out["posinf"], out["neginf"] = nan.sum(), posinf.sum(), neginf.sum()
        finite_abs = torch.where(nan | posinf | neginf, 0.0, xf.abs())  # [...]
        out["absmax"] = finite_abs.amax() if xf.numel() else absmax
    elif x.dtype not in (torch.uint8, torch.bool):
        if x.numel():
            low, high = torch.aminmax(x)
            out["absmax"] = torch.maximum(low.abs(), high.abs()).double()
        if point in schema.INDEX_POINTS and x.dim() == 2:
            out["valid"] = (x >= 0).sum(dim=-1, dtype=torch.int32)  # [T]
    return out


def host_stats(stats: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[dict, np.ndarray | None]:
    """Stats tensors already on the host -> (scalar stats, stats array: head norms and zeros, or valid per row)."""
    scalars: dict = {}
    for key in ("nan", "posinf", "neginf"):
        if key in stats:
            scalars[key] = int(stats[key])
    scalars["nonfinite"] = scalars.get("nan", 0) + scalars.get("posinf", 0) + scalars.get("neginf", 0)
    if "absmax" in stats:
        scalars["absmax"] = float(stats["absmax"])
    array = None
    if "head_norm" in stats:
        norm = stats["head_norm"].numpy()  # [T, H]
        scalars["zero_heads"] = int((norm == 0).all(axis=0).sum()) if norm.size else 0
        if "head_zeros" in stats:
            array = np.empty(norm.shape, dtype=schema.HEAD_STATS_DTYPE)
            array["norm"] = norm
            array["zeros"] = stats["head_zeros"].numpy()
    elif "valid" in stats:
        array = stats["valid"].numpy().astype(schema.ROW_STATS_DTYPE, copy=False)  # [T]
        scalars["empty_rows"] = int((array == 0).sum())
    return scalars, array


def stats_array(tensor: torch.Tensor, point: str) -> np.ndarray | None:
    """The stats array of a stored tensor, computed as stats mode computes it at capture."""
    return host_stats(device_stats(tensor, point, may_sync=True), tuple(tensor.shape))[1]
