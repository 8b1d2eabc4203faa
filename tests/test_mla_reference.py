"""The reference DCP decode on real gloo ranks, against a float64 single-device oracle."""

import dataclasses
import functools

import pytest
import torch

import tensortap
from tensortap.distributed import spawn
from tensortap.mla.scenario import Scenario, run_on_this_rank, run_rank
from tensortap.tolerances import tolerance

from reference_oracle import replay

TOL = tolerance("float32")


@functools.lru_cache(maxsize=None)
def run(scn: Scenario, tap_dir: str | None = None):
    """Spawn the scenario once per test session: (per-rank traces, oracle replay of rank 0's trace)."""
    results = spawn(run_rank, scn.ranks, kwargs=dict(scenario=dataclasses.asdict(scn), collect=True, tap_dir=tap_dir),
                    timeout=300)
    return results, replay(scn, results[0])


def merged_all_heads(results, i):
    return torch.cat([r[i]["merged"] for r in results], dim=1).double()  # [T, H, 512] in TP order


@pytest.mark.parametrize("dcp, interleave, backend", [
    (1, 1, "ag_rs"), (2, 1, "a2a"), (2, 2, "ag_rs"), (4, 1, "ag_rs"), (4, 1, "a2a"), (4, 2, "a2a"),
])
def test_matches_float64_oracle(dcp, interleave, backend):
    scn = Scenario(dcp=dcp, interleave=interleave, backend=backend, fixed=True)
    results, expected = run(scn)
    assert len(expected) == scn.steps * (1 + scn.spec_tokens)
    for i, exp in enumerate(expected):
        where = (results[0][i]["role"], results[0][i]["step"], results[0][i]["spec_pos"])
        assert TOL.allclose(merged_all_heads(results, i).numpy(), exp["merged"].numpy()), where
        for r in results:
            assert TOL.allclose(r[i]["hidden"].double().numpy(), exp["hidden"].numpy()), where


def test_the_bug_zero_heads_no_merge_and_laundered_hidden(tmp_path_factory):
    tap_dir = str(tmp_path_factory.mktemp("bug") / "tap")
    scn = Scenario()  # the draft config as vLLM 0.33.0 builds it
    results, expected = run(scn, tap_dir)
    for i, exp in enumerate(expected):
        role = results[0][i]["role"]
        hidden = [r[i]["hidden"] for r in results]
        assert all(torch.equal(hidden[0], h) for h in hidden[1:]), "the all-reduce makes hidden identical on every rank"
        if role == "target":
            assert TOL.allclose(merged_all_heads(results, i).numpy(), exp["merged"].numpy())
            assert TOL.allclose(hidden[0].double().numpy(), exp["hidden"].numpy())
            continue
        assert results[0][i]["merged"].abs().sum() > 0, "DCP rank 0 keeps its indices"
        for r in results[1:]:
            assert torch.count_nonzero(r[i]["merged"]) == 0, "ranks 1..3 emit all-zero attention"
        error = (hidden[0].double() - exp["hidden"]).norm() / exp["hidden"].norm()
        assert error > 0.3, f"the draft's hidden state is far from the oracle (relative error {error:.2f})"

    d = tensortap.open(tap_dir)
    draft_q = d.select(point="q", role="draft", step=0, spec_pos=0)
    assert [rec.shape for rec in draft_q] == [(2, 2, 576)] * 4, "no query all-gather: 2 heads per rank, not 8"
    assert sorted(rec.meta["head_offset"] for rec in draft_q) == [0, 2, 4, 6]
    assert {(rec.meta["dcp_size"], rec.meta["group_dcp_size"], rec.meta["kv_dcp_size"]) for rec in draft_q} == {(1, 4, 4)}
    target_q = d.select(point="q", role="target", step=0)
    assert [rec.shape for rec in target_q] == [(2, 8, 576)] * 4 and {r.meta["head_offset"] for r in target_q} == {0}
    for rank in (1, 2, 3):
        assert (d.get("slots", role="draft", step=0, spec_pos=0, rank=rank) == -1).all(), "every row filtered away"
        assert torch.isposinf(d.get("lse", role="draft", step=0, spec_pos=0, rank=rank)).all(), "lonely q: +inf"


def test_fixed_draft_matches_the_oracle():
    results, expected = run(Scenario(fixed=True))
    for i, exp in enumerate(expected):
        assert TOL.allclose(results[0][i]["hidden"].double().numpy(), exp["hidden"].numpy())


GOLDEN_POINTS = [
    "block_table", "q", "topk", "slots", "kv_pages", "partial_out", "lse", "merged_out", "attn_out",
    "o_proj_partial", "hidden",
]


def test_golden_ordered_tap_point_names(tmp_path):
    """The names one decode step emits, in order: a rename must change this list deliberately."""
    tap_dir = str(tmp_path / "tap")
    run_on_this_rank(Scenario(ranks=1, dcp=1, steps=1, spec_tokens=2), tap_dir=tap_dir)
    names = [rec.name for rec in sorted(tensortap.open(tap_dir), key=lambda rec: rec.meta["seq"])]
    expected = [f"layers.{layer}.attn.{point}" for layer in (77, 78, 78) for point in GOLDEN_POINTS]
    assert names == expected


def test_dcp4_selects_the_same_tokens_as_one_device():
    """The sharded indexer (local top-k, all-gather, global top-k) picks what a single device picks."""
    results, _ = run(Scenario(fixed=True))
    single = run_on_this_rank(Scenario(ranks=1, dcp=1, fixed=True), collect=True)
    for sharded_fwd, single_fwd in zip(results[0], single):
        a, b = sharded_fwd["topk"], single_fwd["topk"]
        for row_a, row_b in zip(a, b):
            assert set(row_a.tolist()) == set(row_b.tolist())
        assert TOL.allclose(sharded_fwd["hidden"].double().numpy(), single_fwd["hidden"].double().numpy())
