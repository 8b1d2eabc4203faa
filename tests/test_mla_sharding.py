"""DCP token placement: vLLM's formulas against hand-computed tables."""

import torch

from tensortap.mla import sharding


def test_owner_and_local_index_interleave_1():
    t = torch.arange(10)
    assert sharding.owner_rank(t, 4, 1).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert sharding.local_index(t, 4, 1).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_owner_and_local_index_interleave_2():
    t = torch.arange(10)
    assert sharding.owner_rank(t, 2, 2).tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0]
    assert sharding.local_index(t, 2, 2).tolist() == [0, 1, 0, 1, 2, 3, 2, 3, 4, 5]


def test_global_index_inverts_local_index():
    for n, i in [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2), (4, 4)]:
        t = torch.arange(200)
        for r in range(n):
            mine = t[sharding.owner_rank(t, n, i) == r]
            assert torch.equal(sharding.global_index(sharding.local_index(mine, n, i), n, r, i), mine)
    assert sharding.global_index(torch.tensor([-1]), 4, 2, 1).tolist() == [-1]


def test_local_seq_lens_table():
    lens = torch.tensor([10, 3, 0, 8])
    assert [sharding.local_seq_lens(lens, 4, r, 1).tolist() for r in range(4)] == [
        [3, 1, 0, 2], [3, 1, 0, 2], [2, 1, 0, 2], [2, 0, 0, 2]]
    # N=2, I=2: L=10 -> base 4, remainder 2 -> rank 0 takes it all
    assert [sharding.local_seq_lens(torch.tensor([10, 7]), 2, r, 2).tolist() for r in range(2)] == [[6, 4], [4, 3]]


def test_local_seq_lens_count_owned_tokens():
    for n, i in [(2, 1), (4, 1), (2, 2), (4, 2), (3, 4)]:
        for length in range(0, 40):
            owners = sharding.owner_rank(torch.arange(length), n, i)
            expect = [int((owners == r).sum()) for r in range(n)]
            got = [int(sharding.local_seq_lens(torch.tensor([length]), n, r, i)) for r in range(n)]
            assert got == expect, (n, i, length)


def test_slot_mapping_table():
    # block_size 2, DCP 2, I 1: virtual blocks of 4 tokens; request 0 uses physical blocks [5, 2] on each rank.
    table = torch.tensor([[5, 2]], dtype=torch.int32)
    pos = torch.arange(8)
    req = torch.zeros(8, dtype=torch.long)
    rank0 = sharding.slot_mapping(pos, req, table, 2, 2, 0, 1).tolist()
    rank1 = sharding.slot_mapping(pos, req, table, 2, 2, 1, 1).tolist()
    assert rank0 == [10, -1, 11, -1, 4, -1, 5, -1]
    assert rank1 == [-1, 10, -1, 11, -1, 4, -1, 5]


def test_filter_and_convert_table():
    table = torch.tensor([[5, 2]], dtype=torch.int32)
    topk = torch.tensor([[0, 1, 2, 3, 6, 7, -1, 8]], dtype=torch.int32)  # 8 is past the table (2 blocks x 2)
    req = torch.zeros(1, dtype=torch.long)
    assert sharding.filter_and_convert(topk, req, table, 2, 2, 0, 1).tolist() == [[10, -1, 11, -1, 5, -1, -1, -1]]
    assert sharding.filter_and_convert(topk, req, table, 2, 2, 1, 1).tolist() == [[-1, 10, -1, 11, -1, 5, -1, -1]]
    # DCP size 1: plain replicated addressing block_table[t // bs] * bs + t % bs, -1 past the table
    assert sharding.filter_and_convert(topk, req, table, 2, 1, 0, 1).tolist() == [[10, 11, 4, 5, -1, -1, -1, -1]]


def test_filter_finds_every_token_where_the_writer_put_it():
    torch.manual_seed(0)
    for n, i in [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)]:
        block_size, requests, length = 4, 3, 61
        width = -(-length // (block_size * n))
        table = torch.randperm(requests * width).view(requests, width).to(torch.int32)
        pos = torch.arange(length).repeat(requests)
        req = torch.arange(requests).repeat_interleave(length)
        topk = torch.arange(length, dtype=torch.int32).repeat(requests, 1)  # [R, L]
        for r in range(n):
            written = sharding.slot_mapping(pos, req, table, block_size, n, r, i).view(requests, length)
            converted = sharding.filter_and_convert(topk, torch.arange(requests), table, block_size, n, r, i)
            assert torch.equal(converted.long(), written), (n, i, r)
