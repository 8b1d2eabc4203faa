"""Layout-invariant views of one forward's tensors, reassembled across ranks from the metadata.

Two runs of the same inputs under different TP/DCP layouts agree on these:
    q, merged_out, attn_out   heads placed by head_offset: [T, H, D]
    hidden, topk              the same on every rank: the first rank's
    kv_pages                  cache tokens by (request, position), found through each rank's block
                              table and the sharding formulas: [N, 656] rows
The rest depends on the layout, and NOT_INVARIANT says why.
"""

from __future__ import annotations

import numpy as np

from tensortap.analysis import layout
from tensortap.analysis.forward import Forward

HEAD_OFFSET_POINTS = ("q", "merged_out", "attn_out")  # reassembled from their ranks by head_offset
REPLICATED = ("hidden", "topk")
NOT_INVARIANT = {
    "partial_out": "each rank's partial output covers its own KV shard, so it depends on the DCP layout "
                   "(merged_out is compared instead)",
    "lse": "each rank's LSE covers its own KV shard, so it depends on the DCP layout",
    "slots": "physical slots of each rank's shard depend on the layout and the block allocator (topk is compared instead)",
    "block_table": "physical block ids depend on the layout and the block allocator",
    "o_proj_partial": "each rank's share of the row-parallel sum depends on the TP layout (hidden is compared instead)",
}


def layout_key(fw: Forward) -> tuple:
    """The deployment a forward ran on: TP size, the process group's and the cache's DCP size, interleave.

    What the layer believes (dcp_size) is left out on purpose: comparing a layer that believes
    the wrong size with one that believes the right one rank by rank shows the difference."""
    metas = fw.metas()
    return tuple(sorted({(m.get("tp_size"), m.get("group_dcp_size"), m.get("kv_dcp_size"), m.get("interleave"))
                         for m in metas.values()}, key=str)), len(metas)


def heads(fw: Forward, point: str) -> tuple[np.ndarray, np.ndarray] | None:
    """[T, H, D] with every head some rank holds (the first rank's copy), and the mask of heads present."""
    records = [r for r in fw.records(point) if r.stored]
    if not records:
        return None
    total = int(records[0].meta.get("num_heads") or 0)
    pieces = []
    for rec in records:
        value = fw.array(point, rec.rank)  # [T, Hr, D] or [T, Hr*v] for attn_out
        if point == "attn_out":
            local_heads = total // int(rec.meta.get("tp_size") or 1)
            value = value.reshape(value.shape[0], local_heads, -1)  # [T, H_tp, v]
        pieces.append((int(rec.meta.get("head_offset") or 0), value))
    total = max(total, max(o + v.shape[1] for o, v in pieces))
    tokens, width = pieces[0][1].shape[0], pieces[0][1].shape[2]
    out = np.full((tokens, total, width), np.nan)  # [T, H, D]
    present = np.zeros(total, dtype=bool)  # [H]
    for offset, value in pieces:
        new = ~present[offset:offset + value.shape[1]]
        out[:, offset:offset + value.shape[1]][:, new] = value[:, new]
        present[offset:offset + value.shape[1]] = True
    return out, present


def replicated(fw: Forward, point: str) -> np.ndarray | None:
    ranks = [r for r in fw.ranks(point) if fw.record(point, r).stored]
    return fw.array(point, ranks[0]) if ranks else None


def cache_tokens(fw: Forward) -> tuple[np.ndarray, np.ndarray]:
    """Every cached token a rank dumped the page of: (keys [N] = request * 2^32 + position, rows [N, 656])."""
    keys, rows = [], []
    for rank in fw.ranks("kv_pages"):
        rec, pages, table = fw.record("kv_pages", rank), fw.array("kv_pages", rank, exact=True), fw.array("block_table", rank)
        if pages is None or table is None:
            continue
        meta = rec.meta
        block_size, n = int(meta["block_size"]), int(meta.get("kv_dcp_size") or 1)
        dcp_rank, interleave = int(meta.get("group_dcp_rank") or 0), int(meta.get("interleave") or 1)
        for request, length in enumerate(meta.get("seq_lens") or []):
            positions = np.arange(length)  # [L]
            mine = positions[layout.owner(positions, n, interleave) == dcp_rank]  # [L_r]
            local = layout.local(mine, n, interleave)  # [L_r]
            blocks = local // block_size
            inside = blocks < table.shape[1]
            page, found = layout.page_lookup(meta.get("page_ids", []), table[request, blocks[inside]])  # [M], [M]
            keys.append(request * 2**32 + mine[inside][found])
            rows.append(pages[page[found], (local % block_size)[inside][found]])  # [M, 656]
    if not keys:
        return np.zeros(0, np.int64), np.zeros((0, 656), np.uint8)
    keys, rows = np.concatenate(keys), np.concatenate(rows)
    unique, first = np.unique(keys, return_index=True)  # a token dumped by several ranks: the first copy
    return unique, rows[first]
