"""The detectors of issue 9, each against its own corruption of a clean reference dump (DCP4, TP4)."""

import math
import shutil

import numpy as np
import pytest
import torch

import tensortap
from tensortap.analysis import check, layout, run_detector
from tensortap.analysis.detectors import local_len
from corrupt import rewrite_meta, rewrite_tensor

TARGET0 = dict(role="target", step=0)


@pytest.fixture
def copy(dumps, tmp_path):
    def make(name="dcp4"):
        target = str(tmp_path / name)
        shutil.copytree(dumps[name], target)
        return target
    return make


def fires(path, code, ranks=None):
    found = run_detector(code, tensortap.open(path))
    assert found, f"{code} did not fire"
    if ranks is not None:
        assert sorted({r for f in found for r in f.ranks}) == ranks, [(f.ranks, f.message) for f in found]
    assert all(f.op for f in found), "every finding names the op it points at"
    return found


def selection(path, rank, **where):
    with tensortap.open(path) as d:
        topk = d.get("topk", rank=rank, **where).numpy().astype(np.int64)  # [T, K]
        table = d.get("block_table", rank=rank, **where).numpy().astype(np.int64)  # [R, nb]
        meta = d.record("slots", rank=rank, **where).meta
    return topk, table, meta


def last_local_token(path, rank):
    """(row, k) of a selected token that is the last one `rank` holds of its request, at target step 0."""
    topk, _, meta = selection(path, rank, **TARGET0)
    lengths = local_len(np.array(meta["seq_lens"]), 4, meta["group_dcp_rank"], 1)  # [R]
    local = layout.local(np.maximum(topk, 0), 4, 1)  # [T, K]
    mine = (topk >= 0) & (layout.owner(np.maximum(topk, 0), 4, 1) == meta["group_dcp_rank"])
    hits = np.argwhere(mine & (local == lengths[np.arange(len(topk))][:, None] - 1))
    return tuple(hits[0]) if len(hits) else None


def test_a_token_dropped_by_a_local_length_off_by_one(copy):
    path = copy()
    rank, hit = next((r, h) for r in range(4) if (h := last_local_token(path, r)) is not None)

    def drop(slots):
        slots[hit] = -1
        return slots

    rewrite_tensor(path, "slots", drop, rank=rank, **TARGET0)
    found = fires(path, "token-accounting", ranks=[rank])
    assert found[0].evidence["dropped"] == 1 and "local length short by 1" in found[0].evidence["cause"]
    assert found[0].op == "kernel" and found[0].evidence["examples"]["dropped"][0]["row"] == hit[0]


def test_recorded_local_lengths_off_the_formula(copy):
    path = copy()
    _, _, meta = selection(path, 2, **TARGET0)
    rewrite_meta(path, {"local_seq_lens": [n - 1 for n in meta["local_seq_lens"]]}, rank=2, **TARGET0)
    found = fires(path, "token-accounting", ranks=[2])
    assert "local length: recorded local_seq_lens" in found[0].message and found[0].op == "attention metadata"


def test_an_interleave_mismatch(copy):
    path = copy()
    changed = []
    for rank in range(4):
        topk, table, meta = selection(path, rank, **TARGET0)
        wrong = layout.owned_slots(topk, np.arange(len(topk)), table, 4, 4, meta["group_dcp_rank"], 2)  # [T, K]
        rewrite_tensor(path, "slots", lambda s: torch.from_numpy(wrong.astype(np.int32)), rank=rank, **TARGET0)
        changed.append(rank)
    found = fires(path, "token-accounting", ranks=changed)
    assert all("interleave 2" in f.evidence["cause"] and f.op == "index conversion" for f in found)


def _scale_lse(path, rank, factor):
    rewrite_tensor(path, "lse", lambda l: torch.where(torch.isfinite(l), l * factor, l), rank=rank, **TARGET0)


def test_base_2_lse_on_some_ranks(copy):
    path = copy()
    for rank in (1, 3):
        _scale_lse(path, rank, 1 / math.log(2))
    found = fires(path, "lse-sanity", ranks=[1, 3])
    assert all(f.evidence["kind"] == "LSE in base 2" and "LSE in base 2" in f.message for f in found)
    assert all(f.step == 0 and f.role == "target" for f in found)


def test_base_2_lse_recorded_as_such_is_clean(copy):
    """A FlashInfer-style log2 LSE with lse_base=2: the merge audit and the oracle convert it."""
    path = copy()
    for rank in range(4):
        _scale_lse(path, rank, 1 / math.log(2))
        rewrite_meta(path, {"lse_base": "2"}, rank=rank, point="lse", **TARGET0)
    report = check(path)
    assert report.findings == [] and report.verified, [f.message for f in report.findings]


def test_a_zero_lse(copy):
    path = copy()
    rewrite_tensor(path, "lse", lambda l: torch.where(torch.isfinite(l), torch.zeros_like(l), l), rank=2, **TARGET0)
    found = fires(path, "lse-sanity", ranks=[2])
    assert found[0].evidence["kind"] == "LSE not computed"


def test_a_rank_with_a_different_topk_set(copy):
    path = copy()
    topk, _, meta = selection(path, 3, **TARGET0)
    row = topk[0]
    outside = next(t for t in range(meta["seq_lens"][0]) if t not in set(row.tolist()))

    def swap(t):
        t[0, 0] = outside
        return t

    rewrite_tensor(path, "topk", swap, rank=3, **TARGET0)
    found = fires(path, "topk-divergence", ranks=[3])
    assert found[0].evidence["ids_differing"] == {"3": 1} and found[0].op == "indexer"


def test_a_masked_shard(copy):
    path = copy()

    def mask(lse):
        lse[0, :] = float("-inf")
        return lse

    rewrite_tensor(path, "lse", mask, rank=2, **TARGET0)
    found = fires(path, "shard-masked", ranks=[2])
    assert found[0].evidence["rows"] == [0] and "shard masked away" in found[0].message


def test_a_page_rewritten_between_steps(copy):
    path = copy()
    with tensortap.open(path) as d:
        before = d.record("kv_pages", rank=1, role="target", step=0)
        after = d.record("kv_pages", rank=1, role="target", step=1)
        table = d.get("block_table", rank=1, role="target", step=0).numpy()
        seq_lens = before.meta["seq_lens"]
    shared = [p for p in before.meta["page_ids"] if p in after.meta["page_ids"]]
    page = next(p for p in shared if int(np.argwhere(table == p)[0][1]) == 0)  # the request's first block: written
    index = after.meta["page_ids"].index(page)
    assert seq_lens[int(np.argwhere(table == page)[0][0])] > 4 * 4

    def flip(raw):
        raw[index, 1, 7] ^= 0x5A
        return raw

    rewrite_tensor(path, "kv_pages", flip, rank=1, role="target", step=1)
    found = fires(path, "kv-mutated", ranks=[1])
    example = found[0].evidence["examples"][0]
    assert (example["page"], example["slot"], example["first_step"], example["step"]) == (page, page * 4 + 1, 0, 1)
    assert found[0].op == "cache writer"


def test_a_lonely_row_on_a_rank_that_owns_nothing(copy):
    """Prompts of 1, 2 and 5 tokens under DCP4: rank 3 holds nothing of request 0. The lonely row's
    +inf (the kernel's signal) left un-neutralised is named; nothing crashes."""
    path = copy("short-prompts")
    with tensortap.open(path) as d:
        slots = d.get("slots", rank=3, **TARGET0)
    assert (slots[0] < 0).all(), "rank 3 owns nothing of request 0"

    def unneutralised(lse):
        lse[0, :] = float("inf")
        return lse

    rewrite_tensor(path, "lse", unneutralised, rank=3, **TARGET0)
    report = check(path)
    assert not report.errors
    assert {f.code for f in report.findings} == {"lse-nonfinite"} and report.findings[0].ranks == [3]


def test_the_verdict_forms_from_a_post_norm_hidden(copy):
    """A fused all-reduce + RMSNorm records its output as hidden (hidden_kind=post_norm): same verdict."""
    path = copy("bug")
    with tensortap.open(path) as d:
        hidden = [(rec.rank, rec.step, rec.meta.get("spec_pos"), rec.role) for rec in d.iter(point="hidden")]
    for rank, step, spec_pos, role in hidden:
        where = dict(rank=rank, step=step, spec_pos=spec_pos, role=role)
        rewrite_tensor(path, "hidden", lambda h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6), **where)
        rewrite_meta(path, {"hidden_kind": "post_norm"}, point="hidden", **where)
    report = check(path, use_oracle=False)
    assert [v.name for v in report.verdicts] == ["laundered consensus"]
    assert "bit-identical on 4/4 ranks" in report.verdicts[0].explanation


def test_queries_computed_under_dcp_q_replicate_may_differ_in_rounding(copy):
    """dcp_q_replicate: no gather, each rank computed the group's q itself; rounding noise is accepted,
    a real difference is not."""
    path = copy()
    rewrite_meta(path, {"dcp_q_replicate": True}, point="q", **TARGET0)

    def rounding(q):
        return q * (1 + 3e-7)

    rewrite_tensor(path, "q", rounding, rank=1, **TARGET0)
    assert run_detector("query-divergence", tensortap.open(path)) == []

    def different(q):
        q[0, 0, :8] += 1.0
        return q

    rewrite_tensor(path, "q", different, rank=2, **TARGET0)
    found = fires(path, "query-divergence", ranks=[0, 2])
    assert found[0].evidence["dcp_q_replicate"] is True
