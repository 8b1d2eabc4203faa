"""The LSE merge and the kernel's lonely-row semantics, on hand-worked cases."""

import math

import torch

from tensortap.mla.attention import attend, neutralise_lonely_rows
from tensortap.mla.dcp import merge_weights, scale_partial

INF = float("inf")


def merged(outs, lses):
    """Single-process merge of [N, T, H, D] partials with [N, T, H] LSEs."""
    weights, lse_g = merge_weights(torch.tensor(lses, dtype=torch.float64))
    outs = torch.tensor(outs, dtype=torch.float64)
    return torch.stack([scale_partial(outs[r], weights[r]) for r in range(len(outs))]).sum(0), lse_g


def test_equal_lses_give_the_mean():
    out, lse = merged([[[[1.0, 2.0]]], [[[3.0, 6.0]]]], [[[0.7]], [[0.7]]])
    assert torch.allclose(out, torch.tensor([[[2.0, 4.0]]], dtype=torch.float64), rtol=1e-15, atol=0)
    assert math.isclose(lse.item(), 0.7 + math.log(2))


def test_minus_inf_contributes_nothing_even_with_garbage():
    out, lse = merged([[[[1.0, 2.0]]], [[[float("nan"), INF]]]], [[[0.3]], [[-INF]]])
    assert out.tolist() == [[[1.0, 2.0]]] and math.isclose(lse.item(), 0.3)


def test_all_minus_inf_gives_zeros():
    out, lse = merged([[[[5.0]]], [[[7.0]]]], [[[-INF]], [[-INF]]])
    assert out.tolist() == [[[0.0]]] and lse.item() == -INF


def test_plus_inf_and_nan_lonely_rows_are_neutralised():
    out, lse = merged([[[[4.0]]], [[[9.0]]], [[[8.0]]]], [[[1.5]], [[INF]], [[float("nan")]]])
    assert out.tolist() == [[[4.0]]] and math.isclose(lse.item(), 1.5)


def test_weights_match_the_float64_softmax_of_lses():
    lses = torch.tensor([[0.1, 2.0], [-3.0, 2.0], [1.0, -INF]], dtype=torch.float64)  # [N=3, 2]
    weights, lse_g = merge_weights(lses)
    expect = torch.logsumexp(lses, dim=0)
    assert torch.allclose(lse_g, expect) and torch.allclose(weights, torch.exp(lses - expect))
    assert torch.allclose(weights.sum(0), torch.ones(2, dtype=torch.float64))


def test_merge_of_shards_equals_attention_over_the_union():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 576, dtype=torch.float64)
    kv = torch.randn(2, 8, 576, dtype=torch.float64)
    whole, whole_lse = attend(q, kv, torch.ones(2, 8, dtype=torch.bool), 0.05)
    parts = [attend(q, kv, (torch.arange(8) % 2 == r).expand(2, 8), 0.05) for r in range(2)]
    out, lse = merged(torch.stack([p[0] for p in parts]).tolist(), torch.stack([p[1] for p in parts]).tolist())
    assert torch.allclose(out.float(), whole.float(), atol=1e-6) and torch.allclose(lse, whole_lse.double(), atol=1e-6)


def test_kernel_skips_minus_one_and_lonely_rows_are_zero_plus_inf():
    q = torch.randn(2, 2, 576)
    kv = torch.randn(2, 3, 576)
    valid = torch.tensor([[True, False, True], [False, False, False]])
    out, lse = attend(q, kv, valid, 0.1)
    assert torch.equal(out[1], torch.zeros(2, 512)) and torch.equal(lse[1], torch.full((2,), INF))
    only_valid, _ = attend(q[:1], kv[:1, [0, 2]], torch.ones(1, 2, dtype=torch.bool), 0.1)
    assert torch.allclose(out[:1], only_valid)
    slots = torch.tensor([[3, -1, 4], [-1, -1, -1]])
    out2, lse2 = neutralise_lonely_rows(out, lse, slots)
    assert torch.equal(lse2[1], torch.full((2,), -INF)) and torch.equal(out2[1], torch.zeros(2, 512))
    assert torch.equal(lse2[0], lse[0])
