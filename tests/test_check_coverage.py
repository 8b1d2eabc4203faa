"""check on clean runs (DCP 8, interleave 64, several steps), on random-but-valid forwards written
through the public tap API, and on a mode=stats dump of the bug; coverage, --strict and --json."""

import dataclasses
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch

import tensortap
from tensortap.analysis import all_codes, check
from tensortap.distributed import spawn
from tensortap.mla import dcp, sharding
from tensortap.mla.attention import attend
from tensortap.mla.kvcache import pack, unpack
from tensortap.mla.scenario import Scenario, run_rank
from tensortap.format import schema
from corrupt import rewrite_meta


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dumps):
    """Clean reference runs the session's dumps lack (DCP 8 over several steps; interleave 64 with a
    request one rank holds nothing of), and the session's bug dump captured again with mode=stats."""
    base = tmp_path_factory.mktemp("coverage")
    configs = {
        "dcp8": Scenario(ranks=8, dcp=8, fixed=True, steps=3, spec_tokens=1),
        "i64": Scenario(preset="tiny-bs64", ranks=2, dcp=2, interleave=64, fixed=True, steps=2, spec_tokens=2,
                        prompt_lens=(37, 130)),
    }
    paths = {}
    for name, scn in configs.items():
        paths[name] = str(base / name)
        spawn(run_rank, scn.ranks, kwargs=dict(scenario=dataclasses.asdict(scn), tap_dir=paths[name]), timeout=300)
    paths["bug-stats"] = retap(dumps["bug"], str(base / "bug-stats"), mode="stats")
    return paths


def retap(source: str, target: str, **keys) -> str:
    """Capture every record of `source` again through the public tap API, with TAP keys `keys`."""
    tensortap.configure(dir=target, **keys)
    with tensortap.open(source) as d:
        for rec in sorted(d, key=lambda rec: (rec.rank, rec.meta["seq"])):
            meta = {k: v for k, v in rec.meta.items() if k not in schema.SYSTEM_FIELDS}
            tensortap.point(rec.name, rec.tensor(), **meta)
    tensortap.close()
    return target


@pytest.mark.parametrize("name", ["dcp8", "i64"])
def test_clean_runs_are_verified(runs, name):
    report = check(runs[name])
    assert report.findings == [] and report.verified and not report.errors, report.status_line()
    assert report.status_line().startswith("clean") and report.exit(strict=True) == 0
    for code, cov in report.coverage.items():
        assert cov.verified + sum(cov.inapplicable.values()) == cov.forwards == report.forwards, (code, cov)


def test_interleave_64_leaves_a_rank_with_nothing_of_a_request(runs):
    with tensortap.open(runs["i64"]) as d:
        slots = d.get("slots", rank=1, role="target", step=0)  # [2, K]: request 0 (38 tokens) all on rank 0
        assert (slots[0] < 0).all() and (slots[1] >= 0).any()
    assert check(runs["i64"]).coverage["kv-mutated"].verified == 2 * 3


def test_several_steps_keep_the_kv_history(runs):
    report = check(runs["dcp8"])
    assert report.forwards == 3 * 2 and report.coverage["kv-mutated"].verified == report.forwards


@pytest.mark.parametrize("name", ["bug", "dcp1", "dcp2-i2-a2a", "dcp4", "dcp4-i2-a2a", "dcp4-bf16", "dcp1-bf16",
                                  "dcp2-fp16", "short-prompts"])
def test_session_dumps_are_verified_and_never_exit_2(dumps, name):
    report = check(dumps[name])
    assert not report.errors and report.exit_code != 2
    if name != "bug":
        assert report.verified, report.status_line()
    assert not report.unverified(), report.unverified()


# -- mode=stats: the bug named from stats alone ------------------------------------------------------
def consensus_hash(array: np.ndarray) -> int:
    """interfaces.md item 1: sum_i bits_i * ((i mod 65521) + 1) mod 2^64, bits as signed ints of the width."""
    bits = np.ascontiguousarray(array).view(f"<i{array.dtype.itemsize}").reshape(-1).astype(np.int64)
    weights = (np.arange(bits.size, dtype=np.int64) % 65521) + 1
    with np.errstate(over="ignore"):
        return int((bits * weights).sum(dtype=np.int64))


def with_hidden_hash(stats_dir: str, full_dir: str) -> None:
    """Until the writer computes stats["hash"] itself: the same hash from the same run's full dump."""
    with tensortap.open(stats_dir) as d:
        records = list(d.iter(point="hidden"))
    if all("hash" in rec.stats for rec in records):
        return
    with tensortap.open(full_dir) as full:
        for rec in records:
            same = full.record("hidden", rank=rec.rank, step=rec.step, role=rec.role, spec_pos=rec.meta.get("spec_pos"))
            stats = dict(rec.stats, hash=consensus_hash(same.raw()))
            rewrite_meta(stats_dir, {"stats": stats}, point="hidden", rank=rec.rank, step=rec.step, role=rec.role,
                         spec_pos=rec.meta.get("spec_pos"))


def test_stats_mode_names_zero_heads_and_the_laundered_consensus(runs, dumps):
    path = runs["bug-stats"]
    with tensortap.open(path) as d:
        assert not any(rec.stored for rec in d), "a stats-only dump"
    with_hidden_hash(path, dumps["bug"])
    report = check(path)
    assert [v.name for v in report.verdicts] == ["laundered consensus"], report.verdicts
    zero = report.by_code("zero-heads")
    assert zero and all(f.ranks == [1, 2, 3] and f.heads == list(range(2, 8)) and f.role == "draft" for f in zero)
    assert {"config-mismatch", "no-merge", "rank-outlier"} <= report.codes()
    needs = {code for code, cov in report.coverage.items() if any("full tensors" in why for why in cov.skipped)}
    assert {"oracle-mismatch", "merge-mismatch", "kv-mutated", "token-accounting"} <= needs


def test_cli_says_which_detectors_need_full_tensors(runs, dumps, cli):
    with_hidden_hash(runs["bug-stats"], dumps["bug"])
    code, out, _ = cli(["check", runs["bug-stats"]])
    assert code == 1 and "LAUNDERED CONSENSUS" in out and "needs full tensors (mode=full):" in out


# -- coverage, --strict and --json ---------------------------------------------------------------------
def test_a_missing_page_is_unverified_not_clean(dumps, tmp_path, cli):
    """A page the sharding says was read, absent from kv_pages: the oracle cannot verify; never "clean"."""
    path = str(tmp_path / "dump")
    shutil.copytree(dumps["dcp4"], path)
    with tensortap.open(path) as d:
        rec = d.record("kv_pages", rank=1, role="target", step=0)
    rewrite_meta(path, {"page_ids": [p + 10_000 for p in rec.meta["page_ids"]]}, point="kv_pages", rank=1,
                 role="target", step=0)
    report = check(path)
    assert report.findings == [] and report.clean and not report.verified
    assert report.status_line().startswith("no findings; oracle-mismatch unverified on 1 of 4 forwards")
    assert "did not dump page" in report.status_line()
    assert report.exit() == 0 and report.exit(strict=True) == 1
    code, out, _ = cli(["check", path])
    assert code == 0 and "no findings; oracle-mismatch unverified on 1 of 4" in out and "clean:" not in out
    code, out, _ = cli(["check", path, "--strict", "--json"])
    data = json.loads(out)
    assert code == 1 and data["verified"] is False and data["unverified"][0]["detector"] == "oracle-mismatch"
    assert data["coverage"]["oracle-mismatch"]["verified"] == 3 and data["exit_code"] == 1


def test_filtered_points_are_skipped_but_not_gaps(dumps):
    d = tensortap.open(dumps["dcp4"]).select(point=["q", "topk", "partial_out", "lse"])
    report = check(d)
    assert report.verified and report.coverage["oracle-mismatch"].verified == 0
    assert report.coverage["oracle-mismatch"].skipped and not report.coverage["oracle-mismatch"].gaps


# -- property: random but valid forwards through the public tap API ---------------------------------------
def _case(rng: np.random.Generator, layer: int, steps: int = 1, chaos: str | None = None) -> list[tuple]:
    """One random TP x DCP layout, cache and selection; `steps` decode steps of one token per request.
    Returns (point, tensor, meta) per record, the reference's formulas computed in one process."""
    n = int(rng.choice([1, 2, 4]))
    groups = int(rng.choice([1, 2])) if n < 4 else 1
    tp, heads = n * groups, int(rng.choice([1, 2]))
    bs = int(rng.choice([2, 4, 8]))
    interleave = int(rng.choice([i for i in (1, 2, 4, 8) if bs % i == 0]))
    lens = rng.integers(1, 18, size=int(rng.integers(1, 4))).tolist()
    k_top = int(rng.integers(1, 9))
    scale = 576 ** -0.5
    width = math.ceil((max(lens) + steps) / (bs * n))
    tables = [torch.from_numpy(rng.permutation(len(lens) * width).reshape(len(lens), width).astype(np.int32))
              for _ in range(tp)]
    caches = [torch.zeros(len(lens) * width, bs, 656, dtype=torch.uint8) for _ in range(tp)]
    kv_all = [[None] * (max(lens) + steps) for _ in lens]
    w_uv = torch.randn(tp * heads, 512, 8, generator=torch.Generator().manual_seed(layer)) * 0.05  # [H, 512, v]
    w_o = torch.randn(tp * heads, 8, 16, generator=torch.Generator().manual_seed(layer + 1)) * 0.1  # [H, v, C]

    def write(request, positions):
        rows = pack(torch.randn(len(positions), 512) * 0.5, torch.randn(len(positions), 64))  # [P, 656]
        for rank in range(tp):
            r = rank % n
            slots = sharding.slot_mapping(torch.tensor(positions), torch.full((len(positions),), request), tables[rank],
                                          bs, n, r, interleave)  # [P]
            keep = slots >= 0
            caches[rank].view(-1, 656)[slots[keep].long()] = rows[keep]

    for q_, length in enumerate(lens):
        write(q_, list(range(length)))
    records = []
    for step in range(steps):
        seq_lens = [length + step for length in lens]
        if step:
            for q_, length in enumerate(seq_lens):
                write(q_, [length - 1])
        T = len(lens)
        topk = torch.full((T, k_top), -1, dtype=torch.int32)  # [T, K]
        for t, length in enumerate(seq_lens):
            if chaos == "all -1" and t == 0:
                continue
            chosen = rng.permutation(length)[: min(k_top, length)]
            topk[t, : len(chosen)] = torch.from_numpy(chosen.astype(np.int32))
        partial_sum = [None] * tp
        per_rank = {}
        for g in range(groups):
            members = list(range(g * n, (g + 1) * n))
            q = torch.randn(T, n * heads, 576, generator=torch.Generator().manual_seed(layer * 100 + step * 10 + g))
            outs, lses, slots_of = [], [], []
            for rank in members:
                r = rank % n
                req = torch.arange(T)
                slots = sharding.filter_and_convert(topk, req, tables[rank], bs, n, r, interleave)  # [T, K]
                kv = unpack(caches[rank].view(-1, 656)[slots.clamp(min=0).long()])  # [T, K, 576]
                out, lse = attend(q, kv, slots >= 0, scale)  # [T, nH, 512], [T, nH]
                if n > 1:
                    lonely = (slots < 0).all(dim=-1)  # [T]
                    out = out.masked_fill(lonely[:, None, None], 0.0)
                    lse = lse.masked_fill(lonely[:, None], float("-inf"))
                    local = sharding.local_seq_lens(torch.tensor(seq_lens), n, r, interleave)  # [R]
                    lse = dcp.mask_empty_shards(lse, local)
                outs.append(out), lses.append(lse), slots_of.append(slots)
            weights, _ = dcp.merge_weights(torch.stack(lses))  # [N, T, nH]
            for i, rank in enumerate(members):
                own = slice(i * heads, (i + 1) * heads)
                merged = out_sum = torch.zeros(T, heads, 512)
                for j in range(n):
                    out_sum = out_sum + dcp.scale_partial(outs[j][:, own], weights[j][:, own])  # [T, H, 512]
                merged = out_sum if n > 1 else outs[i]
                first = rank * heads
                attn_out = torch.einsum("thl,hlv->thv", merged, w_uv[first:first + heads]).reshape(T, -1)  # [T, H*v]
                partial_sum[rank] = attn_out @ w_o[first:first + heads].reshape(-1, 16)  # [T, C]
                owned = sharding.filter_and_convert(topk, torch.arange(T), tables[rank], bs, n, rank % n, interleave)
                both = torch.cat([owned.reshape(-1), slots_of[i].reshape(-1)]).long()
                pages = torch.unique(both[both >= 0] // bs)  # [P]
                per_rank[rank] = dict(q=q, topk=topk, slots=slots_of[i], partial_out=outs[i], lse=lses[i],
                                      merged_out=merged, attn_out=attn_out, pages=pages, group_offset=g * n * heads)
        hidden = torch.stack(partial_sum).sum(dim=0)  # [T, C]: the all-reduce, the same bits on every rank
        for rank, t in per_rank.items():
            r = rank % n
            local = sharding.local_seq_lens(torch.tensor(seq_lens), n, r, interleave).tolist()
            meta = dict(step=step, layer=layer, role="target", rank=rank, world_size=tp, tp_rank=rank, tp_size=tp,
                        dcp_rank=r, dcp_size=n, group_dcp_rank=r, group_dcp_size=n, kv_dcp_size=n,
                        interleave=interleave, num_heads=tp * heads, seq_lens=seq_lens, local_seq_lens=local,
                        req_ids=list(range(T)), kv_format="fp8_ds_mla", block_size=bs, softmax_scale=scale,
                        kv_lora_rank=512, rope_dim=64, lse_base="e", hidden_kind="sum")
            go, own = t["group_offset"], rank * heads
            points = [("block_table", tables[rank], {}), ("q", t["q"], dict(head_offset=go)), ("topk", t["topk"], {}),
                      ("slots", t["slots"], {}),
                      ("kv_pages", caches[rank][t["pages"]].clone(), dict(page_ids=t["pages"].tolist())),
                      ("partial_out", t["partial_out"], dict(head_offset=go)), ("lse", t["lse"], dict(head_offset=go)),
                      ("merged_out", t["merged_out"], dict(head_offset=own)),
                      ("attn_out", t["attn_out"], dict(head_offset=own)), ("o_proj_partial", partial_sum[rank], {}),
                      ("hidden", hidden.clone(), {})]
            for point, tensor, extra in points:
                records.append((point, tensor, dict(meta, **extra)))
    if chaos == "nan":
        i = int(rng.integers(len(records)))
        point, tensor, meta = records[i]
        if tensor.is_floating_point() and tensor.numel():
            tensor = tensor.clone()
            tensor.view(-1)[int(rng.integers(tensor.numel()))] = float(rng.choice([np.nan, np.inf, -np.inf]))
            records[i] = (point, tensor, meta)
    elif chaos == "missing":
        del records[int(rng.integers(len(records)))]
    elif chaos == "no pages":
        records = [(p, torch.zeros(0, 1, 656, dtype=torch.uint8) if p == "kv_pages" else t,
                    dict(m, page_ids=[]) if p == "kv_pages" else m) for p, t, m in records]
    return records


def _write(path, cases):
    tensortap.configure(dir=path)
    for records in cases:
        for point, tensor, meta in records:
            with tensortap.scope(**{k: meta[k] for k in ("step", "layer", "role")}):
                tensortap.point(f"layers.{meta['layer']}.attn.{point}", tensor,
                                **{k: v for k, v in meta.items() if k not in ("step", "layer", "role")})
    tensortap.close()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    rng = np.random.default_rng(20261201)
    base = tmp_path_factory.mktemp("generated")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only cost here
    try:
        clean = [_case(rng, layer, steps=1 + layer % 3) for layer in range(16)]
        chaos = [_case(rng, 100 + i, steps=1 + i % 2, chaos=kind)
                 for i, kind in enumerate(["nan", "missing", "no pages", "all -1"] * 2)]
    finally:
        torch.set_num_threads(threads)
    paths = {"clean": str(base / "clean"), "chaos": str(base / "chaos")}
    _write(paths["clean"], clean)
    _write(paths["chaos"], chaos)
    return paths


def test_random_valid_forwards_are_clean_and_verified(generated):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "All-NaN slice", no overflow noise
        report = check(generated["clean"])
    assert not report.errors, report.errors
    assert report.findings == [], [(f.code, f.layer, f.message) for f in report.findings[:5]]
    assert report.verified, report.status_line()
    assert set(report.coverage) == set(all_codes())
    assert report.coverage["kv-mutated"].verified == report.forwards


def test_no_detector_raises_on_strange_but_valid_forwards(generated, cli):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        report = check(generated["chaos"])
    assert not report.errors, report.errors
    assert report.exit_code != 2
    code, _, _ = cli(["check", generated["chaos"]])
    assert code in (0, 1)


# -- the writer's losses (issue 13 item 5): a note, and a finding where they hide evidence ---------------
def test_writer_losses_are_notes_and_a_finding_where_points_are_missing(tmp_path, monkeypatch):
    import pandas as pd

    from tensortap.dump import Dump

    rng = np.random.default_rng(7)
    records = next(r for r in (_case(rng, 5) for _ in range(20)) if len({m["rank"] for _, _, m in r}) >= 2)
    records = [(p, t, m) for p, t, m in records if not (p == "merged_out" and m["rank"] == 1)]
    path = str(tmp_path / "dump")
    _write(path, [records])
    totals = pd.DataFrame([{"run": "", "rank": 1, "records_total": 10, "graph_skipped_total": 3, "over_budget_total": 2,
                            "dropped_total": 0, "lost_total": 0, "errors_total": 0}])
    monkeypatch.setattr(Dump, "losses", property(lambda self: totals), raising=False)
    report = check(path)
    assert any("rank 1 lost records: 2 over budget (max_bytes stopped capture), 3 skipped inside CUDA graphs" in n
               for n in report.notes), report.notes
    loss = report.by_code("capture-loss")
    assert [f.ranks for f in loss] == [[1]] and loss[0].evidence["missing_points"] == ["merged_out"]
    assert loss[0].op == "capture" and report.exit_code == 1
