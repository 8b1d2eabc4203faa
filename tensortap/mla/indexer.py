"""A DSA-style lightning indexer: the K cache tokens each decode query attends.

    score[t, j] = sum_h w[t, h] * relu(q_idx[t, h] . k_idx[j]),   w = (hidden @ W_w) * d^-0.5 * n_heads^-0.5

Under DCP each rank scores only its own shard of the index-key cache, keeps its local top-k,
turns local indices into global token ids, and the candidates of the group are all-gathered;
the global top-k (higher score first, ties to the smaller id) wins. Rows with fewer than K
tokens are padded with -1. The indexer's state is sharded by the process group, whatever
the attention layer believes. (vLLM quantises q and k to fp8 before scoring; here they stay
float32: the sharding, not the scoring, is under test.)
"""

from __future__ import annotations

import torch

from tensortap.mla import sharding
from tensortap.mla.dcp import gather_stacked
from tensortap.mla.kvcache import PagedBuffer


def local_scores(hidden: torch.Tensor, w_q: torch.Tensor, w_w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """hidden [T, C], w_q [C, nh, d], w_w [C, nh], keys [T, L, d] -> scores [T, L]."""
    num_heads, dim = w_q.shape[1], w_q.shape[2]
    q_idx = torch.einsum("tc,chd->thd", hidden.float(), w_q.float())  # [T, nh, d]
    weights = hidden.float() @ w_w.float() * (dim**-0.5 * num_heads**-0.5)  # [T, nh]
    per_head = torch.einsum("thd,tld->thl", q_idx, keys.float()).relu()  # [T, nh, L]
    return torch.einsum("th,thl->tl", weights, per_head)  # [T, L]


def shard_slots(req_ids: torch.Tensor, local_lens: torch.Tensor, block_table: torch.Tensor, block_size: int,
                width: int | None = None):
    """Slots of local indices 0..max-1 of each token's request on this rank: ([T, L] slots, [T, L] valid).

    `width` fixes L (>= every local length) so that no host sync sizes it (CUDA-graph capture)."""
    width = width if width is not None else max(int(local_lens.max()), 1)
    local = torch.arange(width, device=req_ids.device)  # [L]
    valid = local[None, :] < local_lens[:, None]  # [T, L]
    blocks = (local // block_size).clamp(max=block_table.shape[1] - 1)  # [L]
    slots = block_table[req_ids][:, blocks].long() * block_size + local % block_size  # [T, L]
    return torch.where(valid, slots, -1), valid  # [T, L], [T, L]


def select_topk(hidden: torch.Tensor, w_q: torch.Tensor, w_w: torch.Tensor, index_cache: PagedBuffer,
                req_ids: torch.Tensor, token_seq_lens: torch.Tensor, block_table: torch.Tensor, topk: int,
                group, group_size: int, group_rank: int, interleave: int, width: int | None = None) -> torch.Tensor:
    """Global top-k token ids [T, K] (int32, -1 padded), scored shard by shard over the DCP process group.
    `width`: a fixed number of local candidates per row (see shard_slots)."""
    local_lens = sharding.local_seq_lens(token_seq_lens, group_size, group_rank, interleave)  # [T]
    slots, valid = shard_slots(req_ids, local_lens, block_table, index_cache.block_size, width)  # [T, L]
    scores = local_scores(hidden, w_q, w_w, index_cache.read(slots))  # [T, L]
    scores = scores.masked_fill(~valid, float("-inf"))  # [T, L]
    if scores.shape[1] < topk:  # every rank offers exactly K candidates (-inf pads)
        scores = torch.nn.functional.pad(scores, (0, topk - scores.shape[1]), value=float("-inf"))  # [T, >=K]
    top_scores, top_local = torch.sort(scores, dim=-1, descending=True, stable=True)  # ties: smaller index first
    top_scores, top_local = top_scores[:, :topk], top_local[:, :topk]  # [T, K]
    top_local = torch.where(torch.isneginf(top_scores), -1, top_local)  # [T, k]
    ids = sharding.global_index(top_local, group_size, group_rank, interleave)  # [T, K]
    if group_size > 1:
        top_scores, ids = _gather_candidates(top_scores, ids, group, group_size)  # [T, N*K]
    return _global_topk(top_scores, ids, topk)  # [T, K]


def _gather_candidates(scores: torch.Tensor, ids: torch.Tensor, group, group_size: int):
    tokens = scores.shape[0]
    all_scores = gather_stacked(scores, group, group_size)  # [N, T, K]
    all_ids = gather_stacked(ids, group, group_size)  # [N, T, K]
    return all_scores.permute(1, 0, 2).reshape(tokens, -1), all_ids.permute(1, 0, 2).reshape(tokens, -1)  # [T, N*K]


def _global_topk(scores: torch.Tensor, ids: torch.Tensor, topk: int) -> torch.Tensor:
    """Best `topk` candidates per row: score descending, ties to the smaller id; -1 pads."""
    id_order = torch.argsort(torch.where(ids < 0, torch.iinfo(ids.dtype).max, ids), dim=-1, stable=True)  # [T, C]
    scores, ids = torch.gather(scores, 1, id_order), torch.gather(ids, 1, id_order)  # [T, C], [T, C]: by id
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)  # [T, C]
    ids = torch.gather(ids, 1, order)  # [T, C]
    scores = torch.gather(scores, 1, order)  # [T, C]
    ids = torch.where(torch.isneginf(scores), -1, ids)  # [T, C]
    if ids.shape[1] < topk:
        pad = torch.full((ids.shape[0], topk - ids.shape[1]), -1, dtype=ids.dtype, device=ids.device)
        ids = torch.cat([ids, pad], dim=1)  # [T, K]
    return ids[:, :topk].to(torch.int32).contiguous()  # [T, K]
