"""kv_pages: the cache pages of this rank that an oracle needs to recompute one forward's attention.

Two sets, united: the pages that the selected tokens map to under the cache's sharding (the cache
writer's DCP size N and interleave I, this rank's place r in its DCP group), and every page the consumed
slots touched (whatever addressing the layer used, right or wrong). For token t of request q, bs the
block size:

    owner(t) = (t mod bs*N) // I mod N          page(t) = block_table[q, t // (bs*N)]   (kept if owner == r)
    page(slot) = slot // block_stride_rows  (slot // bs when the cache is addressed by whole blocks)

The page list has a data-dependent length, so building it syncs with the host once per tapped layer
call; it is skipped while a CUDA graph is being captured (a graph slot needs a fixed shape).
"""

from __future__ import annotations

import torch

from tensortap.integrations.vllm import state
from tensortap.integrations.vllm.layers import _Forward, point


def page_ids(topk: torch.Tensor, slots: torch.Tensor, table: torch.Tensor, req_of_token: torch.Tensor,
             block_size: int, num_blocks: int, writer_dcp: int, interleave: int, rank: int,
             block_stride_rows: int | None) -> torch.Tensor:
    """Sorted unique physical page ids [P] (int32) of the pages defined in the module docstring."""
    rows = topk.shape[0]
    req = req_of_token[:rows].long()  # [T]
    tokens = topk.long()  # [T, K]
    valid = tokens >= 0  # [T, K]
    tokens = tokens.clamp(min=0)  # [T, K]
    virtual = block_size * writer_dcp
    owner = (tokens % virtual) // interleave % writer_dcp  # [T, K]
    column = (tokens // virtual).clamp(max=table.shape[1] - 1)  # [T, K]
    sharded = table[req[:, None], column].long()  # [T, K]
    selected = sharded[valid & (owner == rank)]  # [S]
    consumed = slots.long()  # [T, K]
    touched = consumed[consumed >= 0] // (block_stride_rows or block_size)  # [U]
    pages = torch.cat([selected, touched])  # [S + U]
    pages = pages[(pages >= 0) & (pages < num_blocks)]  # [<= S + U]
    return torch.unique(pages).to(torch.int32)  # [P], sorted


def tap_kv_pages(fwd: _Forward, topk, slots, block_stride_rows) -> None:
    """kv_pages [P, bs, 656] with page_ids [P] (see the module docstring)."""
    md, cache = fwd.md, fwd.kv_cache
    table = getattr(md, "block_table", None)
    req = getattr(md, "req_id_per_token", None)
    if table is None or req is None or cache is None or cache.dim() != 3 or state.capturing():
        return
    meta = fwd.meta
    ids = page_ids(topk, slots, table, req, int(meta.get("block_size", cache.shape[1])), cache.shape[0],
                   int(meta.get("kv_dcp_size", 1)), int(meta.get("interleave", 1)),
                   int(meta.get("kv_dcp_rank", meta.get("group_dcp_rank", 0))), block_stride_rows)  # [P]
    point(fwd, "kv_pages", cache[ids.long()], page_ids=ids)  # [P, bs, 656]
