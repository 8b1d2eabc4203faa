"""tensortap diff: identical dumps, one perturbed element, draft against target, DCP4 against DCP1, across ranks."""

import json
import shutil

import pytest

import tensortap
from tensortap.diffing import DiffError, across_ranks, diff
from tensortap.mla.scenario import Scenario, run_on_this_rank

from corrupt import rewrite_meta, rewrite_tensor


@pytest.fixture
def copy_of(dumps, tmp_path):
    made = []

    def make(name):
        made.append(name)
        target = str(tmp_path / f"{name}-{len(made)}")
        shutil.copytree(dumps[name], target)
        return target

    return make


def test_identical_dumps_are_equal(dumps, copy_of, cli):
    report = diff(dumps["dcp4"], copy_of("dcp4"))
    assert report.equal and report.first is None and report.mode == "per-rank"
    assert {p.point for p in report.pairs} == set(tensortap.open(dumps["dcp4"]).points)
    code, out, _ = cli(["diff", dumps["dcp4"], copy_of("dcp4")])
    assert code == 0 and "equal within tolerance" in out
    assert diff(dumps["bug"], copy_of("bug")).equal, "matching +inf LSEs (lonely rows) are equal, not NaN-different"


def test_one_perturbed_element_is_the_first_divergence(dumps, copy_of, cli):
    b = copy_of("dcp4")

    def nudge(t):
        t[1, 0, 17] += 0.5
        return t

    rewrite_tensor(b, "merged_out", nudge, role="target", step=1, rank=2)
    report = diff(dumps["dcp4"], b)
    first = report.first
    assert (first.role, first.step, first.point, first.rank) == ("target", 1, "merged_out", 2)
    assert first.comparison.max_abs_at == [1, 0, 17] and first.comparison.over == 1
    assert first.comparison.max_abs == pytest.approx(0.5, rel=1e-3)
    assert report.context.point == "merged_out" and report.context.rank == 1, "the last matching record before it"
    assert sum(not p.comparison.equal for p in report.pairs) == 1
    code, out, _ = cli(["diff", dumps["dcp4"], b, "--json"])
    data = json.loads(out)
    assert code == 1 and data["first_divergence"]["max_abs_at"] == [1, 0, 17]


def test_draft_against_target_in_the_bug(dumps):
    report = diff(dumps["bug"], dumps["bug"], role_a="draft", role_b="target")
    first = report.first
    assert (first.role, first.role_b, first.layer, first.layer_b, first.step, first.spec_pos) == \
        ("draft", "target", 78, 77, 0, 0)
    assert first.point == "q" and first.comparison.kind == "shape"
    assert first.comparison.note == "shape [2, 2, 576] vs [2, 8, 576]", "no query all-gather in the draft"
    assert report.context.point == "block_table", "the block table both layers use matches"
    differ = {p.point for p in report.pairs if not p.comparison.equal and p.step == 0}
    assert {"q", "partial_out", "lse", "slots", "merged_out", "hidden"} <= differ


def test_dcp4_against_dcp1_agrees_on_what_is_layout_invariant(dumps):
    report = diff(dumps["dcp4"], dumps["dcp1"])
    assert report.mode == "shard-aware" and report.equal, report.first and report.first.label
    compared = {p.point for p in report.pairs}
    assert compared == {"q", "topk", "kv_pages", "merged_out", "attn_out", "hidden"}
    assert set(report.not_comparable) == {"block_table", "slots", "partial_out", "lse", "o_proj_partial"}
    assert "DCP layout" in report.not_comparable["partial_out"]
    kv = [p for p in report.pairs if p.point == "kv_pages"]
    assert all(p.comparison.total > 0 for p in kv), "cache tokens were found in both layouts"


def test_bf16_runs_of_two_layouts_agree(dumps):
    report = diff(dumps["dcp4-bf16"], dumps["dcp1-bf16"])
    assert report.mode == "shard-aware" and report.equal, report.first and report.first.label


def test_diff_can_be_called_again_after_the_module_is_imported(dumps):
    import tensortap.diffing  # noqa: F401  (a submodule named diff would have shadowed the function)

    assert tensortap.diff(dumps["dcp4"], dumps["dcp4"]).equal
    assert tensortap.diff(dumps["dcp4"], dumps["dcp4"]).equal


def test_a_selection_that_matches_nothing_is_an_error(dumps, cli):
    code, _, err = cli(["diff", dumps["dcp4"], dumps["dcp4"], "--steps", "40-41"])
    assert code == 2 and "nothing to compare" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(["diff", dumps["dcp4"], dumps["dcp4"], "--role-a", "verifier"])
    assert code == 2 and err.strip() == ("error: --role-a 'verifier' is not a role; choose from target, draft; "
                                         "see 'tensortap diff --help'")
    code, _, err = cli(["diff", dumps["dcp4"], dumps["dcp4"], "--points", "q,lsee"])
    assert code == 2 and "'lsee' not a tap point; choose from block_table, q," in err


def test_summary_table_says_shape_and_dash(dumps, cli):
    """Shape-only rows say "shape", not max abs 0 / cosine 1; jaccard only for index points."""
    code, out, _ = cli(["diff", dumps["bug"], dumps["bug"], "--role-a", "draft", "--role-b", "target"])
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in
            ("q", "topk", "merged_out", "kv_pages")}
    assert code == 1
    assert rows["q"][-5:] == ["shape", "-", "-", "-", "-"], rows["q"]
    assert rows["merged_out"][-1] == "-" and rows["merged_out"][-5] != "shape", "no jaccard for a float point"
    assert rows["topk"][-5:-1] == ["-", "-", "-", "-"] and rows["topk"][-1] != "-", "indices: jaccard only"
    assert "tokens" in " ".join(rows["kv_pages"])
    summary = {row["point"]: row for row in diff(dumps["bug"], dumps["bug"], role_a="draft", role_b="target").summary()}
    assert summary["q"]["shape"] == summary["q"]["pairs"] and summary["q"]["max_abs"] is None
    assert summary["merged_out"]["jaccard"] is None and summary["topk"]["cosine"] is None


def test_dcp4_against_the_bug_shows_where_it_breaks(dumps):
    report = diff(dumps["dcp4"], dumps["bug"])
    first = report.first
    assert (first.role, first.step, first.spec_pos, first.point) == ("draft", 0, 0, "q")


def test_across_ranks(dumps, cli):
    rows = across_ranks(dumps["bug"])
    q = [r for r in rows if r.point == "q" and r.disagree]
    assert q and all("missing query all-gather" in r.reason for r in q)
    assert {tuple(r.disagree) for r in q} == {(1, 2, 3)}
    assert all(not r.disagree for r in rows if r.point == "hidden"), "the all-reduce makes hidden agree"
    code, out, _ = cli(["diff", dumps["bug"], "--across-ranks"])
    assert code == 1 and "missing query all-gather" in out and "hidden: agrees" in out
    code, out, _ = cli(["diff", dumps["dcp2-i2-a2a"], "--across-ranks"])
    assert code == 0 and "q: agrees" in out and "hidden: agrees" in out


def test_different_models_refused(dumps, copy_of, cli):
    other = copy_of("dcp4")
    rewrite_meta(other, {"num_heads": 16})
    with pytest.raises(DiffError, match="different models"):
        diff(dumps["dcp4"], other)
    code, _, err = cli(["diff", dumps["dcp4"], other])
    assert code == 2 and "num_heads 8 vs 16" in err and len(err.strip().splitlines()) == 1


def test_different_batches_refused(tmp_path, cli):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_on_this_rank(Scenario(ranks=1, dcp=1, steps=1, spec_tokens=0), tap_dir=a)
    run_on_this_rank(Scenario(ranks=1, dcp=1, steps=1, spec_tokens=0, prompt_lens=(37, 50, 20)), tap_dir=b)
    code, _, err = cli(["diff", a, b])
    assert code == 2 and "different batches (2 vs 3 query tokens" in err


def test_usage_errors(dumps, cli):
    code, _, err = cli(["diff", dumps["dcp4"]])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: missing dump B: give two dumps") and "Error" not in err
    code, _, err = cli(["diff"])
    assert code == 2 and err.strip() == "error: Missing argument 'A'; see 'tensortap diff --help'"
    code, _, err = cli(["diff", dumps["dcp4"], dumps["dcp4"], "--across-ranks"])
    assert code == 2 and "--across-ranks takes one dump" in err and len(err.strip().splitlines()) == 1
