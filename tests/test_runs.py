"""Runs in one directory, phases, the writers' loss totals, and filter keys: what the reader makes of
them (Dump) and what ls/check/diff/show say. Segments are forged with h5py (no capture needed)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tensortap
from tensortap.format import schema
from test_reader_hostile import forge, meta_of

SECOND = 1_000_000_000


def writer_run(directory: str, run_id: str | None, rank: int, start_ns: int, steps=range(2), pid: int = 100,
               totals: dict | None = None, phases: dict | None = None, committed: bool = True) -> str:
    """One writer run's segment: records of `steps` on `rank`, captured from `start_ns` on."""
    records = []
    for i, step in enumerate(steps):
        extra = {"phase": phases[step]} if phases and step in phases else {}
        meta = meta_of(i, "lse", rank=rank, step=step, time_ns=start_ns + i * 1000, **extra)
        records.append((meta, np.full((2, 4), rank + step, np.float32)))
    root = {"rank": rank, "pid": pid + rank, "start_time_ns": start_ns, "host": "h",
            "config": json.dumps({"compress": "none"}), **(totals or {})}
    root["run_id"] = run_id  # None: a segment from before run ids
    name = f"rank{rank:05d}-h-{pid + rank}{'-' + run_id if run_id else ''}.00000.tap.h5{'' if committed else '.tmp'}"
    return forge(os.path.join(directory, name), records, root=root, committed=committed)


def one_job(directory: str, run_ids: list[str], start_ns: int, pid: int = 100, **kw) -> None:
    """A job of len(run_ids) ranks, one writer run each, capturing at the same time."""
    for rank, run_id in enumerate(run_ids):
        writer_run(directory, run_id, rank, start_ns + rank * 1000, pid=pid, **kw)


def test_ranks_of_one_job_are_one_run(tmp_path):
    one_job(str(tmp_path), ["a1", "a2", "a3", "a4"], 10 * SECOND)
    d = tensortap.open(str(tmp_path))
    assert len(d) == 8 and d.ranks == [0, 1, 2, 3]
    assert len(d.runs) == 1 and d.runs[0].id == "a1" and sorted(d.runs[0].writers) == ["a1", "a2", "a3", "a4"]


def test_two_runs_in_one_directory_must_be_picked(tmp_path, cli):
    directory = str(tmp_path)
    one_job(directory, ["aaaa1", "aaaa2"], 10 * SECOND)
    one_job(directory, ["bbbb1", "bbbb2"], 100 * SECOND, pid=200)  # the same ranks, later: a second run
    with pytest.raises(tensortap.SelectionError, match="holds 2 runs: aaaa1 .ranks 0-1, 4 records.*; bbbb1"):
        tensortap.open(directory)
    for command in (["ls", directory], ["check", directory, "--no-oracle"], ["diff", directory, directory],
                    ["show", directory, "lse"]):
        code, out, err = cli(command)
        assert code == 2 and len(err.strip().splitlines()) == 1, (command, err)
        assert "holds 2 runs" in err and "aaaa1" in err and "bbbb1" in err and "--run" in err, err
    first = tensortap.open(directory, run="aaaa2")  # any writer run of a run picks it
    assert len(first) == 4 and {r.meta["time_ns"] // SECOND for r in first} == {10}
    assert len(tensortap.open(directory, run="bbbb")) == 4  # a unique prefix
    assert len(tensortap.open(directory, run="all")) == 8
    code, out, err = cli(["ls", directory, "--run", "bbbb1", "--json"])
    assert code == 0 and json.loads(out)["records"] == 4 and json.loads(out)["runs"][0]["run"] == "bbbb1"
    code, out, err = cli(["ls", directory, "--run", "all"])
    assert code == 0 and "run aaaa1 (ranks 0-1" in out and "run bbbb1 (ranks 0-1" in out
    code, out, err = cli(["check", directory, "--run", "aaaa1", "--no-oracle", "--json"])
    assert code in (0, 1) and json.loads(out)["records"] == 4
    code, out, err = cli(["diff", directory, directory, "--run-a", "aaaa1", "--run-b", "bbbb1", "--json"])
    assert code in (0, 1), err
    code, out, err = cli(["ls", directory, "--run", "cccc"])
    assert code == 2 and "run 'cccc' matches no run" in err and len(err.strip().splitlines()) == 1


def test_a_second_configure_in_one_process_is_a_second_run(tmp_path):
    """Issue 11 item 1: one process, one rank, two writer runs (two run ids) in one directory."""
    directory = str(tmp_path)
    writer_run(directory, "c0ffee01", 0, 10 * SECOND, steps=[0])
    writer_run(directory, "c0ffee02", 0, 11 * SECOND, steps=[1])
    with pytest.raises(tensortap.SelectionError, match="holds 2 runs"):
        tensortap.open(directory)
    assert tensortap.open(directory, run="c0ffee02").steps == [1]


def test_old_segments_without_run_ids_group_by_process(tmp_path):
    directory = str(tmp_path)
    one_job(directory, [None, None], 10 * SECOND)
    d = tensortap.open(directory)
    assert len(d.runs) == 1 and d.runs[0].id == "h-100-10000000000"
    one_job(directory, [None, None], 50 * SECOND, pid=300)
    with pytest.raises(tensortap.SelectionError, match="h-100-10000000000 .*h-300-50000000000"):
        tensortap.open(directory)
    assert len(tensortap.open(directory, run="h-300-50000000000")) == 4


def test_golden_file_is_one_run():
    d = tensortap.open(os.path.join(os.path.dirname(__file__), "data", "golden.tap.h5"))
    assert len(d.runs) == 1 and len(d) == 6


def test_phases_are_left_out_by_default(tmp_path, cli):
    directory = str(tmp_path)
    writer_run(directory, "d1", 0, 10 * SECOND, steps=range(4), phases={0: "warmup", 1: "capture"})
    d = tensortap.open(directory)
    assert d.steps == [2, 3] and d.excluded_phases == {"warmup": 1, "capture": 1}
    assert tensortap.open(directory, phases="all").steps == [0, 1, 2, 3]
    assert tensortap.open(directory, phases=("run", "warmup")).steps == [0, 2, 3]
    with pytest.raises(tensortap.SelectionError, match="unknown phase 'warm'; valid phases: run, warmup, capture"):
        tensortap.open(directory, phases=("warm",))
    code, out, err = cli(["ls", directory])
    assert code == 0 and "excluded 1 capture record(s)" in out and "excluded 1 warmup record(s)" in out
    code, out, err = cli(["ls", directory, "--all-phases", "--json"])
    assert code == 0 and json.loads(out)["records"] == 4
    code, out, err = cli(["show", directory, "lse", "--step", "0", "--all-phases", "--json"])
    assert code == 0 and json.loads(out)["meta"]["phase"] == "warmup"
    code, out, err = cli(["check", directory, "--no-oracle", "--json"])
    assert json.loads(out)["records"] == 2


def test_losses_per_run_and_rank(tmp_path, cli):
    directory = str(tmp_path)
    totals = {"records_total": 40, "bytes_total": 4096, "dropped_total": 1, "over_budget_total": 3,
              "lost_total": 5, "errors_total": 2, "graph_skipped_total": 7}
    writer_run(directory, "e1", 0, 10 * SECOND, totals=totals)
    writer_run(directory, "e2", 1, 10 * SECOND, totals={k: 0 for k in totals})
    writer_run(directory, "e3", 2, 10 * SECOND)  # a writer from before totals at each flush: unknown
    d = tensortap.open(directory)
    losses = d.losses
    assert list(losses.columns) == ["run", "rank", *schema.LOSS_TOTALS]
    assert list(losses["rank"]) == [0, 1, 2] and set(losses["run"]) == {"e1"}
    assert losses.loc[0, "over_budget_total"] == 3 and losses.loc[0, "graph_skipped_total"] == 7
    assert losses.loc[1, "errors_total"] == 0 and losses["lost_total"].isna().tolist() == [False, False, True]
    assert d.dropped == {0: 1}
    code, out, err = cli(["ls", directory])
    assert code == 0
    line = next(l for l in out.splitlines() if l.startswith("losses"))
    assert line == "losses rank 0: dropped 1, over_budget 3, lost 5, errors 2, graph_skipped 7; the writer wrote 40 records"
    assert sum(l.startswith("losses") for l in out.splitlines()) == 1
    code, out, err = cli(["ls", directory, "--json"])
    rank0 = json.loads(out)["per_rank"][0]
    assert (rank0["over_budget"], rank0["errors"], rank0["lost"], rank0["graph_skipped"]) == (3, 2, 5, 7)
    assert json.loads(out)["per_rank"][2]["lost"] is None


def test_totals_of_a_crashed_segment_count(tmp_path):
    """Totals kept current at each flush: a .tmp left by a crash has them, the latest segment wins."""
    directory = str(tmp_path)
    writer_run(directory, "f1", 0, 10 * SECOND, totals={"errors_total": 1}, committed=False)
    d = tensortap.open(directory)
    assert d.truncated and d.losses.loc[0, "errors_total"] == 1


def test_unknown_filter_keys_list_the_valid_ones(tmp_path):
    writer_run(str(tmp_path), "g1", 0, 10 * SECOND)
    d = tensortap.open(str(tmp_path))
    with pytest.raises(tensortap.SelectionError, match=r"unknown filter key 'ranks'; valid keys: point, step, "
                                                        r"layer, role, rank, .*spec_pos"):
        d.select(ranks=1)
    with pytest.raises(tensortap.SelectionError, match="unknown filter key 'spec'"):
        d.select(spec=0)
    with pytest.raises(tensortap.SelectionError, match="unknown filter key 'ranks'"):
        list(d.iter("lse", ranks=1))
    assert len(d.select(spec_pos=None, time_ns=10 * SECOND)) == 1  # schema keys and keys the records hold


# -- with real captures ------------------------------------------------------------------------------
def test_second_configure_in_one_directory_is_listed_as_two_runs(tap_dir, cli):
    import torch

    for step in range(2):
        tensortap.configure(dir=tap_dir, writer="thread")
        tensortap.point("layers.0.attn.lse", torch.full((2, 2), float(step)), step=step)
        tensortap.close()
    code, out, err = cli(["ls", tap_dir])
    assert code == 2 and "holds 2 runs" in err and len(err.strip().splitlines()) == 1, err
    runs = tensortap.open(tap_dir, run="all").runs
    assert len(runs) == 2 and all(len(r.id) == 8 for r in runs)
    for step, run in enumerate(runs):  # in start order
        code, out, err = cli(["ls", tap_dir, "--run", run.id, "--json"])
        assert code == 0 and json.loads(out)["steps"] == [step], (out, err)


def test_ls_shows_what_max_bytes_stopped(tap_dir, cli):
    import torch

    tensortap.configure(dir=tap_dir, writer="thread", max_bytes="1K")
    for step in range(4):
        tensortap.point("layers.0.attn.lse", torch.zeros(64), step=step)  # 256 B each... then 512 B
        tensortap.point("layers.0.attn.q", torch.zeros(128), step=step)
    tensortap.close()
    d = tensortap.open(tap_dir)
    over = int(d.losses.loc[0, "over_budget_total"])
    assert over > 0 and len(d) + over == 8
    code, out, err = cli(["ls", tap_dir])
    assert code == 0 and f"losses rank 0: over_budget {over}; the writer wrote {len(d)} records" in out, out
    code, out, err = cli(["ls", tap_dir, "--json"])
    assert json.loads(out)["per_rank"][0]["over_budget"] == over
