"""Capture-time stats: what `mode=stats` writes instead of the tensor, and what every record carries.

Computed with torch on whatever device the tensor is on, so that stats mode on a GPU
moves a few small tensors to the host instead of the whole record:

    every tensor     nan, posinf, neginf, nonfinite, zeros (exact), absmax (finite values)
    [T, H, D] heads  norm[t, h] = ||x[t, h, :]||_2 (float32), zeros[t, h] = #{d : x[t, h, d] == 0}
                     zero_heads = #{h : x[:, h, :] == 0 everywhere}
    [T, K] indices   valid[t] = #{k : idx[t, k] >= 0},  empty_rows = #{t : valid[t] == 0}
"""

from __future__ import annotations

import numpy as np
import torch

from tensortap.format import schema


def device_stats(tensor: torch.Tensor, point: str) -> dict[str, torch.Tensor]:
    """Stats as small tensors on the tensor's own device (no host sync)."""
    out: dict[str, torch.Tensor] = {}
    x = tensor.detach()
    if x.dtype.is_floating_point:
        xf = x.float()  # [...] exact upcast of bf16/fp16/fp8
        nan = torch.isnan(xf)
        posinf = torch.isposinf(xf)
        neginf = torch.isneginf(xf)
        finite_abs = torch.where(nan | posinf | neginf, 0.0, xf.abs())  # [...]
        out["nan"] = nan.sum()
        out["posinf"] = posinf.sum()
        out["neginf"] = neginf.sum()
        out["absmax"] = finite_abs.amax() if xf.numel() else torch.zeros((), device=x.device)
        out["zeros"] = (xf == 0).sum()
        if point in schema.HEAD_POINTS and xf.dim() == 3:
            out["head_norm"] = torch.linalg.vector_norm(xf, dim=-1)  # [T, H]
            out["head_zeros"] = (xf == 0).sum(dim=-1, dtype=torch.int32)  # [T, H]
    elif x.dtype == torch.bool:
        out["zeros"] = (~x).sum()
    else:
        out["zeros"] = (x == 0).sum()
        out["absmax"] = x.abs().amax().double() if x.numel() else torch.zeros((), device=x.device)
        if point in schema.INDEX_POINTS and x.dim() == 2:
            out["valid"] = (x >= 0).sum(dim=-1, dtype=torch.int32)  # [T]
    return out


def host_stats(stats: dict[str, torch.Tensor], shape: tuple[int, ...]) -> tuple[dict, np.ndarray | None]:
    """Stats tensors already on the host -> (scalar stats, stats array for the record)."""
    scalars: dict = {}
    for key in ("nan", "posinf", "neginf", "zeros"):
        if key in stats:
            scalars[key] = int(stats[key])
    scalars["nonfinite"] = scalars.get("nan", 0) + scalars.get("posinf", 0) + scalars.get("neginf", 0)
    if "absmax" in stats:
        scalars["absmax"] = float(stats["absmax"])
    array = None
    if "head_norm" in stats:
        norm = stats["head_norm"].numpy()  # [T, H]
        zeros = stats["head_zeros"].numpy()  # [T, H]
        array = np.empty(norm.shape, dtype=schema.HEAD_STATS_DTYPE)
        array["norm"] = norm
        array["zeros"] = zeros
        width = shape[-1]
        scalars["zero_heads"] = int((zeros == width).all(axis=0).sum()) if width else 0
    elif "valid" in stats:
        array = stats["valid"].numpy().astype(schema.ROW_STATS_DTYPE, copy=False)  # [T]
        scalars["empty_rows"] = int((array == 0).sum())
    return scalars, array
