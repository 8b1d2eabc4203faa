"""The parallel layout a forward's metadata describes, and the KV sharding, in numpy.

Written from DESIGN section 3 and the facts file, independently of `tensortap.mla`:

    owner(t) = (t // I) % N        local(t) = (t // (N*I)) * I + t % I
    slot(t)  = block_table[req, local // bs] * bs + local % bs   (on the owner; -1 elsewhere)

Both forms of the slot (virtual blocks of bs*N tokens, or local index // bs) agree because the
interleave I divides the block size, which vLLM asserts. DCP groups are contiguous blocks of
the TP group (TP4/DCP2: tp ranks [0,1] and [2,3]).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def owner(tokens: np.ndarray, dcp_size: int, interleave: int) -> np.ndarray:
    return (tokens // interleave) % dcp_size


def local(tokens: np.ndarray, dcp_size: int, interleave: int) -> np.ndarray:
    return (tokens // (dcp_size * interleave)) * interleave + tokens % interleave


def owned_slots(topk: np.ndarray, rows_to_requests: np.ndarray, block_table: np.ndarray, block_size: int,
                dcp_size: int, dcp_rank: int, interleave: int) -> np.ndarray:
    """Where each selected token lives on `dcp_rank` under the cache's sharding: [T, K] slots, -1 if not here."""
    valid = topk >= 0  # [T, K]
    ids = np.where(valid, topk, 0)  # [T, K]
    mine = valid & (owner(ids, dcp_size, interleave) == dcp_rank)  # [T, K]
    loc = local(ids, dcp_size, interleave)  # [T, K]
    block = loc // block_size  # [T, K]
    in_table = block < block_table.shape[1]  # [T, K]
    rows = block_table[rows_to_requests]  # [T, nb]
    base = np.take_along_axis(rows, np.minimum(block, block_table.shape[1] - 1), axis=1).astype(np.int64)  # [T, K]
    return np.where(mine & in_table, base * block_size + loc % block_size, -1)  # [T, K]


def page_lookup(page_ids: np.ndarray, block_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each physical block id sits among a dump's `page_ids` ([M] index) and whether it is there ([M] bool)."""
    page_ids = np.asarray(page_ids, dtype=np.int64)
    if not len(page_ids):
        return np.zeros(len(block_ids), dtype=np.int64), np.zeros(len(block_ids), dtype=bool)
    order = np.argsort(page_ids)
    at = np.minimum(np.searchsorted(page_ids[order], block_ids), len(page_ids) - 1)  # [M]
    return order[at], (block_ids >= 0) & (page_ids[order][at] == block_ids)


def rows_to_requests(meta: dict, rows: int) -> np.ndarray | None:
    """Request index of each query row: `req_ids` when recorded, else one row per request (decode)."""
    if meta.get("req_ids") is not None:
        return np.asarray(meta["req_ids"], dtype=np.int64)
    seq_lens = meta.get("seq_lens")
    if seq_lens is not None and len(seq_lens) == rows:
        return np.arange(rows)
    return None


def tp_group_of(meta: dict, rank: int) -> int:
    """An id shared by the ranks of one TP group: the global rank of its tp rank 0."""
    return rank - int(meta.get("tp_rank", rank))


def dcp_groups(metas: dict[int, dict]) -> list[list[int]]:
    """Ranks grouped by the DCP process group they are in (group_dcp_size contiguous tp ranks)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for rank, meta in sorted(metas.items()):
        size = int(meta.get("group_dcp_size") or 1)
        groups[(tp_group_of(meta, rank), int(meta.get("tp_rank", rank)) // size)].append(rank)
    return [sorted(members) for _, members in sorted(groups.items())]


def tp_groups(metas: dict[int, dict]) -> list[list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for rank, meta in sorted(metas.items()):
        groups[tp_group_of(meta, rank)].append(rank)
    return [sorted(members) for _, members in sorted(groups.items())]
