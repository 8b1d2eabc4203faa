"""tensortap check: the bug's verdict, clean runs, and each detector against its own targeted corruption."""

import json
import shutil

import pytest
import torch

import tensortap
from tensortap.analysis import run_detector
from corrupt import rewrite_meta, rewrite_tensor


@pytest.fixture
def clean_copy(dumps, tmp_path):
    target = str(tmp_path / "dump")
    shutil.copytree(dumps["dcp4"], target)
    return target


def test_bug_verdict_names_layer_role_ranks_heads_and_cause(dumps):
    report = tensortap.check(dumps["bug"])
    assert [v.name for v in report.verdicts] == ["laundered consensus"]
    verdict = report.verdicts[0]
    assert (verdict.layer, verdict.role) == (78, "draft")
    assert verdict.explanation == (
        "draft layer 78: ranks 1-3 emit all-zero attention for heads 2-7 (6/8) at steps 0-1; "
        "the o_proj all-reduce makes hidden bit-identical on 4/4 ranks; "
        "cause: the layer believes dcp_size=1, its process group has 4")
    zero = report.by_code("zero-heads")
    assert zero and all(f.ranks == [1, 2, 3] and f.heads == list(range(2, 8)) and f.role == "draft" for f in zero)
    config = report.by_code("config-mismatch")
    assert config and config[0].evidence == {"dcp_size": 1, "group_dcp_size": 4, "kv_dcp_size": 4}
    assert {"no-merge", "query-divergence", "empty-topk", "rank-outlier", "oracle-mismatch"} <= report.codes()
    assert all(f.role == "draft" for f in report.findings), "the target layer is right"
    assert not report.notes


@pytest.mark.parametrize("name", ["dcp1", "dcp2-i2-a2a", "dcp4", "dcp4-i2-a2a", "dcp4-bf16", "dcp2-fp16",
                                  "short-prompts"])
def test_clean_runs_have_no_findings(dumps, name):
    report = tensortap.check(dumps[name])
    assert report.findings == [] and report.verdicts == [] and report.clean, [f.message for f in report.findings]
    assert not report.notes and not report.errors, (report.notes, report.errors)


def test_partial_outputs_of_ranks_that_hold_nothing_are_not_zero_heads(dumps):
    """Prompts of 1, 2 and 5 tokens under DCP4: some ranks rightly hold no selected token."""
    d = tensortap.open(dumps["short-prompts"]).select(point=["q", "topk", "slots", "partial_out", "lse"])
    assert any((rec.tensor() == -1).all(dim=-1).any() for rec in d.iter(point="slots")), "lonely rows exist"
    report = tensortap.check(d)
    assert report.clean, [f.message for f in report.findings]


def test_without_hidden_the_consensus_is_unverified(dumps):
    d = tensortap.open(dumps["bug"]).select(point=["q", "topk", "partial_out", "lse"])  # the README's example TAP
    report = tensortap.check(d)
    assert [v.name for v in report.verdicts] == ["unverified consensus"]
    assert "hidden was not captured" in report.verdicts[0].explanation


def test_a_detector_that_breaks_makes_the_check_incomplete(dumps, monkeypatch, cli):
    from tensortap import analysis

    def broken(fw):
        raise RuntimeError("boom")

    monkeypatch.setitem(analysis.DETECTORS, "zero-heads", broken)
    report = tensortap.check(dumps["dcp4"])
    assert report.errors and "zero-heads" in report.errors[0] and not report.clean and report.exit_code == 2
    code, out, _ = cli(["check", dumps["dcp4"]])
    assert code == 2 and "check incomplete" in out


def fires(path, code, **where):
    found = run_detector(code, tensortap.open(path))
    assert found, f"{code} did not fire"
    for key, value in where.items():
        assert all(getattr(f, key) == value for f in found), (key, [getattr(f, key) for f in found])
    return found


TARGET0 = dict(role="target", step=0)


def test_zero_one_ranks_heads(clean_copy):
    rewrite_tensor(clean_copy, "merged_out", torch.zeros_like, rank=1, **TARGET0)
    found = fires(clean_copy, "zero-heads", ranks=[1], heads=[2, 3])
    assert found[0].step == 0


def test_skip_the_merge(clean_copy):
    with tensortap.open(clean_copy) as d:
        partial = d.get("partial_out", rank=2, **TARGET0)
    rewrite_tensor(clean_copy, "merged_out", lambda t: partial[:, 4:6].clone(), rank=2, **TARGET0)
    fires(clean_copy, "merge-mismatch", ranks=[2], heads=[4, 5])


def test_flip_a_ranks_believed_dcp_size(clean_copy):
    assert rewrite_meta(clean_copy, {"dcp_size": 1}, rank=3, **TARGET0) == 11
    found = fires(clean_copy, "config-mismatch", ranks=[3])
    assert found[0].evidence == {"dcp_size": 1, "group_dcp_size": 4, "kv_dcp_size": 4}


def test_plus_inf_in_an_lse(clean_copy):
    def poison(lse):
        lse[0, 5] = float("inf")
        return lse

    rewrite_tensor(clean_copy, "lse", poison, rank=0, **TARGET0)
    fires(clean_copy, "lse-nonfinite", ranks=[0], heads=[5])


def test_perturbed_fp8_tile_scale_only_the_oracle_sees(clean_copy):
    with tensortap.open(clean_copy) as d:
        slots = d.get("slots", rank=1, **TARGET0)
        pages = d.record("kv_pages", rank=1, **TARGET0).meta["page_ids"]
    slot = int(slots[0][slots[0] >= 0][0])
    page, row = pages.index(slot // 4), slot % 4

    def double_scale(raw):
        scale = raw[page, row, 512:516].clone().view(torch.float32) * 2
        raw[page, row, 512:516] = scale.view(torch.uint8)
        return raw

    rewrite_tensor(clean_copy, "kv_pages", double_scale, rank=1, **TARGET0)
    report = tensortap.check(clean_copy)
    # the kernel read the old scale: the recompute disagrees with its output and its LSE, and the
    # page as dumped at step 0 differs from the same page at step 1
    assert report.codes() == {"oracle-mismatch", "lse-sanity", "kv-mutated"}
    assert tensortap.check(clean_copy, use_oracle=False).codes() == {"kv-mutated"}


def test_nan_in_q(clean_copy):
    def poison(q):
        q[0, 0, 0] = float("nan")
        return q

    rewrite_tensor(clean_copy, "q", poison, rank=0, **TARGET0)
    found = fires(clean_copy, "nonfinite", ranks=[0])
    assert found[0].evidence["point"] == "q" and found[0].evidence["nan"] == 1


def test_heads_permuted_after_the_reduce_scatter(clean_copy):
    rewrite_tensor(clean_copy, "merged_out", lambda t: t[:, [1, 0]].clone(), rank=3, **TARGET0)
    fires(clean_copy, "merge-mismatch", ranks=[3], heads=[6, 7])
    fires(clean_copy, "oracle-mismatch", ranks=[3], heads=[6, 7])


def test_a_rank_that_selected_nothing(clean_copy):
    rewrite_tensor(clean_copy, "slots", lambda s: torch.full_like(s, -1), rank=2, **TARGET0)
    fires(clean_copy, "empty-topk", ranks=[2])


def test_a_slot_outside_the_shard(clean_copy):
    with tensortap.open(clean_copy) as d:
        foreign = int(d.get("slots", rank=1, **TARGET0).max()) + 1  # not where rank 0 keeps any selected token

    def stray(slots):
        row = slots[0]
        row[torch.nonzero(row >= 0)[0, 0]] = foreign
        return slots

    rewrite_tensor(clean_copy, "slots", stray, rank=0, **TARGET0)
    fires(clean_copy, "topk-out-of-shard", ranks=[0])


def test_queries_that_differ_inside_a_dcp_group(clean_copy):
    def nudge(q):
        q[1, 3, 7] += 1e-3
        return q

    rewrite_tensor(clean_copy, "q", nudge, rank=1, **TARGET0)
    fires(clean_copy, "query-divergence")


def test_a_rank_contributing_nothing_to_the_all_reduce(clean_copy):
    rewrite_tensor(clean_copy, "o_proj_partial", torch.zeros_like, rank=2, **TARGET0)
    fires(clean_copy, "rank-outlier", ranks=[2])


def test_no_merge_fires_on_the_bug_only(dumps):
    fires(dumps["bug"], "no-merge", role="draft", ranks=[0, 1, 2, 3])
    assert run_detector("no-merge", tensortap.open(dumps["dcp4"])) == []


def test_cli_exit_codes_and_json(dumps, clean_copy, cli):
    code, out, _ = cli(["check", dumps["bug"]])
    assert code == 1 and "LAUNDERED CONSENSUS" in out and "draft layer 78" in out and "(2x)" in out
    code, out, _ = cli(["check", dumps["bug"], "--json", "--no-oracle"])
    data = json.loads(out)
    assert code == 1 and data["verdicts"][0]["name"] == "laundered consensus"
    assert {f["code"] for f in data["findings"]} >= {"zero-heads", "config-mismatch"}
    assert "oracle-mismatch" not in {f["code"] for f in data["findings"]}
    code, out, _ = cli(["check", dumps["dcp4"]])
    assert code == 0 and "clean" in out
    code, _, err = cli(["check", str(clean_copy) + "-missing"])
    assert code == 2 and "no such file" in err
