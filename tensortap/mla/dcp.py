"""Decode context parallelism: the query all-gather, the LSE merge, and the head reduce-scatter.

Each rank of a DCP group of N ranks attends all N*H_tp heads of its group against its own
KV shard, then the partial outputs are merged with their log-sum-exps (correct_attn_out):

    lse_r <- -inf where lse_r is NaN or +inf
    m      = max_r lse_r                    (0 when every lse_r is -inf)
    lse_g  = m + log(sum_r exp(lse_r - m))
    f_r    = exp(lse_r - lse_g)              (NaN or +inf -> 0; all -inf gives f_r = 0 and out 0)
    out    = sum_r f_r * out_r               (exactly 0 where f_r == 0, whatever out_r holds)

`ag_rs` all-gathers the LSEs, scales its own partial and reduce-scatters along heads; `a2a`
sends each rank its own heads from every rank and merges there. Either way rank r of the
group ends with heads [r*H_tp, (r+1)*H_tp) of the group: its own TP heads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def gather_stacked(x: torch.Tensor, group, group_size: int) -> torch.Tensor:
    """x [A, ...] from every rank of the group -> [N, A, ...] in group-rank order."""
    out = torch.empty(group_size * x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)  # [N*A, ...]
    _all_gather(out, x.contiguous(), group=group)
    return out.view(group_size, *x.shape)  # [N, A, ...]


def all_gather_heads(x: torch.Tensor, group, group_size: int) -> torch.Tensor:
    """[T, H_tp, D] on each rank -> [T, N*H_tp, D], heads in group-rank order."""
    tokens, heads, width = x.shape
    gathered = gather_stacked(x, group, group_size)  # [N, T, H_tp, D]
    return gathered.permute(1, 0, 2, 3).reshape(tokens, group_size * heads, width)  # [T, N*H_tp, D]


def mask_empty_shards(lse: torch.Tensor, local_lens: torch.Tensor) -> torch.Tensor:
    """Rows whose request has no token on this rank get lse = -inf before the merge: lse [T, H], local_lens [T]."""
    return lse.masked_fill((local_lens == 0)[:, None], float("-inf"))  # [T, H]


def merge_weights(lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank LSEs [N, ...] -> (weights f_r [N, ...], merged lse_g [...]), by the formula above."""
    inf = float("inf")
    clean = torch.where(torch.isnan(lses) | (lses == inf), -inf, lses)  # [N, ...]
    m = clean.amax(dim=0)  # [...]
    m = torch.where(m == -inf, 0.0, m)  # [...]
    lse_g = m + torch.log(torch.exp(clean - m).sum(dim=0))  # [...]; -inf when all are -inf
    delta = lses - lse_g  # [N, ...]; the raw lse, as the ag_rs kernel uses it
    delta = torch.where(torch.isnan(delta) | (delta == inf), -inf, delta)  # [N, ...]
    return torch.exp(delta), lse_g  # [N, ...], [...]


def scale_partial(out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out [T, H, D] * f [T, H], exactly 0 where f == 0 (kills NaN/inf in out)."""
    scaled = out * weight[..., None]  # [T, H, D]
    return torch.where(weight[..., None] == 0, 0.0, scaled)  # [T, H, D]


def combine_ag_rs(out: torch.Tensor, lse: torch.Tensor, group, group_size: int, group_rank: int) -> torch.Tensor:
    """All-gather LSEs, scale this rank's partial, reduce-scatter (sum) along heads: [T, N*H_tp, D] -> [T, H_tp, D]."""
    tokens, group_heads, width = out.shape
    heads = group_heads // group_size
    lses = gather_stacked(lse, group, group_size)  # [N, T, N*H_tp]
    weights, _ = merge_weights(lses)  # [N, T, N*H_tp]
    scaled = scale_partial(out.float(), weights[group_rank])  # [T, N*H_tp, D]
    chunks = scaled.view(tokens, group_size, heads, width).permute(1, 0, 2, 3).contiguous()  # [N, T, H_tp, D]
    merged = torch.empty(tokens, heads, width, dtype=chunks.dtype, device=chunks.device)  # [T, H_tp, D]
    _reduce_scatter(merged, chunks.view(group_size * tokens, heads, width), group=group)
    return merged.to(out.dtype)  # [T, H_tp, D]


def combine_a2a(out: torch.Tensor, lse: torch.Tensor, group, group_size: int) -> torch.Tensor:
    """All-to-all: receive this rank's heads from every rank, merge in float32: [T, N*H_tp, D] -> [T, H_tp, D]."""
    tokens, group_heads, width = out.shape
    heads = group_heads // group_size
    send_out = out.float().view(tokens, group_size, heads, width).permute(1, 0, 2, 3).contiguous()  # [N, T, H_tp, D]
    send_lse = lse.view(tokens, group_size, heads).permute(1, 0, 2).contiguous()  # [N, T, H_tp]
    recv_out = torch.empty_like(send_out)  # [N, T, H_tp, D]: rank r's partial for my heads
    recv_lse = torch.empty_like(send_lse)  # [N, T, H_tp]
    dist.all_to_all_single(recv_out, send_out, group=group)
    dist.all_to_all_single(recv_lse, send_lse, group=group)
    weights, _ = merge_weights(recv_lse)  # [N, T, H_tp]
    merged = torch.stack([scale_partial(recv_out[r], weights[r]) for r in range(group_size)]).sum(dim=0)  # [T, H_tp, D]
    return merged.to(out.dtype)  # [T, H_tp, D]


def combine(out: torch.Tensor, lse: torch.Tensor, group, group_size: int, group_rank: int, backend: str):
    """Merge the DCP group's partial outputs; returns this rank's own heads [T, H_tp, D]."""
    if backend == "a2a":
        return combine_a2a(out, lse, group, group_size)
    return combine_ag_rs(out, lse, group, group_size, group_rank)
