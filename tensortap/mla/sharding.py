"""Where a token of the KV cache lives under DCP: vLLM 0.33.0's formulas, N = DCP size, I = interleave.

    owner(t)       = (t // I) % N
    local(t)       = (t // (N*I)) * I + t % I            index of t in its owner's shard
    global(l, r)   = (l // I) * (N*I) + r*I + l % I      the inverse, on rank r
    local_len(L,r) = base + clip(L - base*N - r*I, 0, I), base = L // I // N * I

With I = 1, token t lives on rank t % N. With N = 1 the same code is plain replicated
addressing, `block_table[t // bs] * bs + t % bs`.
"""

from __future__ import annotations

import torch


def owner_rank(positions: torch.Tensor, dcp_size: int, interleave: int) -> torch.Tensor:
    return (positions // interleave) % dcp_size  # [...]


def local_index(positions: torch.Tensor, dcp_size: int, interleave: int) -> torch.Tensor:
    return (positions // (dcp_size * interleave)) * interleave + positions % interleave  # [...]


def global_index(local: torch.Tensor, dcp_size: int, dcp_rank: int, interleave: int) -> torch.Tensor:
    """Global token id of local index `local` on `dcp_rank` (-1 stays -1)."""
    ids = (local // interleave) * (dcp_size * interleave) + dcp_rank * interleave + local % interleave  # [...]
    return torch.where(local >= 0, ids, -1)  # [...]


def local_seq_lens(seq_lens: torch.Tensor, dcp_size: int, dcp_rank: int, interleave: int) -> torch.Tensor:
    """How many of the first `seq_lens` tokens of each request live on `dcp_rank`."""
    base = seq_lens // interleave // dcp_size * interleave  # [R]
    remainder = torch.clamp(seq_lens - base * dcp_size - dcp_rank * interleave, 0, interleave)  # [R]
    return base + remainder  # [R]


def slot_mapping(positions: torch.Tensor, req_ids: torch.Tensor, block_table: torch.Tensor, block_size: int,
                 dcp_size: int, dcp_rank: int, interleave: int) -> torch.Tensor:
    """Physical slot of each new token on this rank; -1 for tokens another rank owns (the writer skips them).

    vbs = bs*N; vb = pos // vbs; off = pos % vbs; slot = block_table[req, vb]*bs + (off // (N*I))*I + off % I.
    """
    virtual_block_size = block_size * dcp_size
    virtual_block = positions // virtual_block_size  # [T]
    offset = positions % virtual_block_size  # [T]
    is_local = owner_rank(offset, dcp_size, interleave) == dcp_rank  # [T]
    local_offset = local_index(offset, dcp_size, interleave)  # [T]
    slots = block_table[req_ids, virtual_block].long() * block_size + local_offset  # [T]
    return torch.where(is_local, slots, -1)  # [T]


def filter_and_convert(topk: torch.Tensor, req_ids: torch.Tensor, block_table: torch.Tensor, block_size: int,
                       dcp_size: int, dcp_rank: int, interleave: int) -> torch.Tensor:
    """Global top-k token ids -> this rank's physical slots (triton_filter_and_convert_dcp_index).

    Kept only when owner(t) == dcp_rank; -1 for negative ids, remote ids, and local blocks past
    the block table's width. There is no check against the sequence length: the indexer is
    trusted to emit valid positions.
    """
    num_blocks = block_table.shape[1]
    invalid = topk < 0  # [T, K]
    remote = owner_rank(topk, dcp_size, interleave) != dcp_rank  # [T, K]
    local = local_index(topk.clamp(min=0), dcp_size, interleave)  # [T, K]
    block = local // block_size  # [T, K]
    in_table = block < num_blocks  # [T, K]
    rows = block_table[req_ids]  # [T, nb]
    base = torch.gather(rows, 1, block.clamp(max=num_blocks - 1)).long()  # [T, K]
    slots = base * block_size + local % block_size  # [T, K]
    return torch.where(invalid | remote | ~in_table, -1, slots).to(torch.int32)  # [T, K]
