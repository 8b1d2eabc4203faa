"""Tap points inside real CUDA graphs (marked gpu), and the reference's sync-free static path that the
`--cuda-graph` decode loop captures (its eager twin runs on the CPU too)."""

import dataclasses
import logging

import numpy as np
import pytest
import torch

import tensortap
from tensortap.distributed import spawn
from tensortap.mla.kvcache import PagedBuffer
from tensortap.mla.model import ProcessGroups, write_rows
from tensortap.mla.scenario import DecodeRunner, Scenario, run_rank

gpu = pytest.mark.gpu
needs_4 = pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs")


def run_records(directory):
    """(name, step, spec_pos, rank) -> (meta, stored bytes) of a dump's run-phase records."""
    out = {}
    for rec in tensortap.open(directory):
        if rec.meta.get("phase", "run") != "run" or rec.point == "trigger":
            continue
        key = (rec.name, rec.step, rec.meta.get("spec_pos"), rec.rank)
        assert key not in out, key
        data = rec.tensor() if rec.stored else None
        out[key] = (rec.meta, None if data is None else data.contiguous().view(-1).view(torch.uint8).numpy())
    return out


def assert_same_dumps(a, b, meta_keys=("seq_lens", "local_seq_lens", "page_ids", "head_offset", "dtype", "shape",
                                       "role", "layer", "req_ids")):
    ra, rb = run_records(a), run_records(b)
    assert sorted(ra) == sorted(rb)
    for key in ra:
        (ma, da), (mb, db) = ra[key], rb[key]
        assert (da is None) == (db is None) and (da is None or np.array_equal(da, db)), f"{key}: not bit-identical"
        for k in meta_keys:
            assert ma.get(k) == mb.get(k), (key, k)


# -- the static path on the CPU -------------------------------------------------------------------------------
@pytest.mark.parametrize("slots", [[3, -1, 7], [-1, -1, -1], [-1, 0, -1], [0], []])
def test_sync_free_cache_writes_equal_the_masked_write(slots):
    rows = torch.arange(len(slots) * 4, dtype=torch.float32).view(len(slots), 4) + 100  # [T, 4]
    a, b = PagedBuffer(2, 4, 4, torch.float32), PagedBuffer(2, 4, 4, torch.float32)
    a.data.copy_(torch.randn(2, 4, 4))
    b.data.copy_(a.data)
    index = torch.tensor(slots, dtype=torch.long)
    a.write(index, rows)
    write_rows(b, index, rows)
    assert torch.equal(a.data, b.data)


def test_device_built_metadata_equals_the_host_built(tmp_path):
    """The graph's metadata (built from device positions) and the eager twin's (from host positions) agree."""
    scn = Scenario(preset="tiny", ranks=1, dcp=1, steps=1, static_shapes=True)
    runner = DecodeRunner(scn, ProcessGroups.build(1))
    from tensortap.mla.model import DecodeMetadata

    pos = runner.prompts + 3
    host = DecodeMetadata.build(pos, runner.block_table, scn.cfg.block_size, 1, 0, 1)
    dev = DecodeMetadata.build_on_device(pos.clone(), runner.block_table, scn.cfg.block_size, 1, 0, 1, 64)
    for field in ("positions", "req_ids", "seq_lens", "slot_mapping", "local_seq_lens"):
        assert torch.equal(getattr(host, field), getattr(dev, field)), field


def test_the_static_path_keeps_the_bug_verdict_on_cpu_ranks(tmp_path):
    scn = Scenario(steps=2, spec_tokens=1, static_shapes=True)
    directory = str(tmp_path / "static")
    spawn(run_rank, 4, workdir=str(tmp_path), timeout=300,
          kwargs=dict(scenario=dataclasses.asdict(scn), tap_dir=directory))
    report = tensortap.check(directory)
    assert [v.name for v in report.verdicts] == ["laundered consensus"] and report.verdicts[0].role == "draft"


# -- real CUDA graphs ---------------------------------------------------------------------------------------------
def capture_graph(tokens, width=64, points=("hidden",)):
    static_in = torch.zeros(tokens, width, device="cuda")
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _ = static_in * 3  # warm-up outside the capture (not tapped)
    torch.cuda.current_stream().wait_stream(side)
    assert not tensortap.capturing()
    with torch.cuda.graph(graph), tensortap.scope(step=-1, role="target", phase="capture"):
        assert tensortap.capturing(), "the integrations' question: is this stream capturing?"
        out = static_in * 3
        for point in points:
            tensortap.point(f"layers.0.attn.{point}", out)
        out.add_(1)  # after the tap: the slot holds the value at the point
    return graph, static_in, out


@gpu
def test_graph_replays_record_replayed_values_bit_exact_with_the_replay_step(tap_dir):
    tensortap.configure(dir=tap_dir)
    graph, static_in, out = capture_graph(4)
    expected = {}
    for step in (10, 11, 12):
        static_in.copy_(torch.randn(4, 64))
        expected[step] = (static_in * 3).cpu()
        with tensortap.scope(step=step, role="target", num_tokens=4):
            graph.replay()
        static_in.fill_(float("nan"))  # the next writes cannot reach a drained record
    torch.cuda.synchronize()
    counters = tensortap.stats()
    tensortap.close()
    assert counters["graph_skipped"] == 0 and counters["errors"] == 0
    d = tensortap.open(tap_dir)
    assert d.steps == [10, 11, 12] and len(d) == 3
    for step, want in expected.items():
        got = d.get("hidden", step=step)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), step
        assert d.record("hidden", step=step).meta["phase"] == "run"


@gpu
@pytest.mark.parametrize("mode", ["full", "stats"])
def test_replays_drained_to_pinned_memory_by_the_model_thread_are_exact(tap_dir, mode, monkeypatch):
    """Once the pinned pool holds a buffer of the graph's size class, the model's thread copies each
    replay's slots straight to it; more than DIRECT_BYTES go through one device copy first. Values and
    stats equal those of an eager run, every step; a scope tensor snapshotted before the capture (a
    buffer outside the arena) is drained too."""
    from tensortap.capture import graphs
    from tensortap.format import stats as host_stats

    calls = []
    original = graphs.Registry.to_pinned
    monkeypatch.setattr(graphs.Registry, "to_pinned", lambda self, e, lease: calls.append(1) or original(self, e, lease))
    tensortap.configure(dir=tap_dir, mode=mode)
    static_in = torch.zeros(128, 8, 512, device="cuda")  # 2 MiB of fp32: past DIRECT_BYTES in full mode
    lens = torch.tensor([5, 7, 9], device="cuda")
    graph = torch.cuda.CUDAGraph()
    with tensortap.scope(seq_lens=lens):
        with torch.cuda.graph(graph), tensortap.scope(step=-1, role="target", phase="capture"):
            tensortap.point("layers.0.attn.partial_out", static_in * 2)
            tensortap.point("layers.0.attn.lse", static_in[:, :, 0] + 1)
    want = {}
    for step in range(8):
        static_in.copy_(torch.randn(128, 8, 512))
        static_in[step, 3] = 0
        want[step] = ((static_in * 2).cpu(), (static_in[:, :, 0] + 1).cpu())
        with tensortap.scope(step=step, role="target"):
            graph.replay()
        tensortap.flush()  # the writer side primes the pinned pool between steps
    tensortap.close()
    assert calls, "later replays were copied to pinned memory on the model's thread"
    d = tensortap.open(tap_dir)
    for step, (out, lse) in want.items():
        rec = d.record("partial_out", step=step)
        assert rec.meta["seq_lens"] == [5, 7, 9]
        if mode == "full":
            assert torch.equal(rec.tensor(), out) and torch.equal(d.get("lse", step=step), lse), step
        else:
            stats, arrays = host_stats.compute(out.numpy(), "float32", "partial_out", keep_arrays=True)
            assert rec.stats == {**rec.stats, **stats} and np.array_equal(rec.stats_array()["zeros"], arrays["zeros"])


@gpu
def test_two_graphs_of_different_batch_sizes_keep_their_slots_apart(tap_dir):
    tensortap.configure(dir=tap_dir)
    g2, in2, _ = capture_graph(2)
    g8, in8, _ = capture_graph(8)
    in2.fill_(1.0)
    in8.fill_(2.0)
    for step in range(3):
        with tensortap.scope(step=step, role="target"):
            (g2 if step % 2 else g8).replay()
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert [tuple(d.get("hidden", step=s).shape) for s in range(3)] == [(8, 64), (2, 64), (8, 64)]
    assert [float(d.get("hidden", step=s)[0, 0]) for s in range(3)] == [6.0, 3.0, 6.0]


@gpu
def test_the_graph_budget_stops_slot_allocation_with_one_message(tap_dir, caplog):
    tensortap.configure(dir=tap_dir, graph_bytes=1500)  # one [4, 64] fp32 slot is 1 KiB
    with caplog.at_level(logging.ERROR, logger="tensortap"):
        graph, _, _ = capture_graph(4, points=("hidden", "attn_out", "o_proj_partial"))
        with tensortap.scope(step=0):
            graph.replay()
    tensortap.close()
    assert tensortap.stats()["graph_skipped"] == 2 and tensortap.stats()["records"] == 1
    assert len([r for r in caplog.records if "graph_bytes" in r.getMessage()]) == 1


@gpu
def test_stats_mode_inside_a_graph_equals_the_host_stats(tap_dir):
    from tensortap.format import stats as host_stats

    tensortap.configure(dir=tap_dir, mode="stats")
    static_in = torch.zeros(3, 8, 32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tensortap.point("layers.0.attn.partial_out", static_in * 2)
    x = torch.randn(3, 8, 32)
    x[:, 5] = 0
    x[1, 2, 3] = float("nan")
    static_in.copy_(x)
    with tensortap.scope(step=7, role="draft"):
        graph.replay()
    tensortap.close()
    rec = tensortap.open(tap_dir).record("partial_out")
    want, array = host_stats.compute((x * 2).numpy(), "float32", "partial_out", keep_arrays=True)
    assert not rec.stored and rec.step == 7 and rec.stats == {**rec.stats, **want}
    assert np.array_equal(rec.stats_array()["zeros"], array["zeros"])


@gpu
def test_graph_stats_with_num_tokens_cover_only_the_real_rows(tap_dir):
    """Padding rows of a replay (past num_tokens) hold junk; the stats are those of the real rows."""
    from tensortap.format import stats as host_stats

    tensortap.configure(dir=tap_dir, mode="stats")
    static_in = torch.zeros(6, 4, 16, device="cuda")  # [T, H, D]: rows 4 and 5 are padding
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tensortap.point("layers.0.attn.merged_out", static_in * 1)
        tensortap.point("layers.0.attn.hidden", static_in.view(6, -1) + 0)  # [T, H * D]
    x = torch.randn(6, 4, 16)
    x[:4, 2] = 0  # a zero head in the real rows
    x[4:] = float("nan")
    static_in.copy_(x)
    with tensortap.scope(step=3, role="target", num_tokens=4):
        graph.replay()
    tensortap.close()
    d = tensortap.open(tap_dir)
    for point, real in (("merged_out", x[:4]), ("hidden", x[:4].reshape(4, -1))):
        rec = d.record(point, step=3)
        want, array = host_stats.compute(real.numpy(), "float32", point, keep_arrays=True)
        assert rec.meta["shape"] == list(real.shape) and not rec.stored
        assert rec.stats == {**rec.stats, **want} and rec.stats["nonfinite"] == 0
        if array is not None:
            assert np.array_equal(rec.stats_array()["zeros"], array["zeros"])
            assert np.array_equal(rec.stats_array()["norm"], array["norm"])


@gpu
def test_a_trigger_inside_graph_replays_dumps_the_ring(tap_dir):
    tensortap.configure(dir=tap_dir, trigger="zero-heads", ring=2, trigger_steps=1)
    static_in = torch.zeros(2, 4, 16, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tensortap.point("layers.0.attn.merged_out", static_in + 0)
    for step in range(10):
        x = torch.randn(2, 4, 16)
        if step == 5:
            x[:, 3] = 0
        static_in.copy_(x)
        with tensortap.scope(step=step, role="draft"):
            graph.replay()
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert sorted({r.step for r in d if r.point != "trigger"}) == [3, 4, 5, 6]
    assert [r.meta["trigger"]["step"] for r in d if r.point == "trigger"] == [5]


@gpu
def test_an_unhooked_capture_is_skipped_and_the_graph_still_works(tap_dir):
    from tensortap.capture import graphs

    tensortap.configure(dir=tap_dir)
    graphs.uninstall(torch.cuda.CUDAGraph)  # a capture the hooks do not see (another graph wrapper)
    try:
        static_in = torch.ones(8, device="cuda")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = static_in * 3
            tensortap.point("layers.0.attn.hidden", out, step=1)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), torch.full((8,), 3.0))
    finally:
        from tensortap.capture import runtime

        graphs.install(torch.cuda.CUDAGraph, runtime._GRAPH_HOOKS)
    tensortap.close()
    assert tensortap.stats()["graph_skipped"] == 1 and tensortap.stats()["errors"] == 0


@gpu
@pytest.mark.parametrize("mode", ["full", "stats"])
def test_reference_cuda_graph_dump_equals_the_eager_dump(tmp_path, mode):
    """The whole step (target + 2 draft passes) captured once and replayed per step: every record of
    every step bit-identical to the eager run of the same sync-free code, and the same check verdict."""
    dumps = {}
    for label, graph in (("eager", False), ("graph", True)):
        scn = Scenario(preset="glm5", ranks=1, dcp=1, dtype="bfloat16", steps=3, spec_tokens=2,
                       static_shapes=True, cuda_graph=graph)
        dumps[label] = str(tmp_path / label)
        tensortap.configure(dir=dumps[label], mode=mode)
        runner = DecodeRunner(scn, ProcessGroups.build(1), device="cuda:0")
        for step in range(scn.steps):
            runner.step(step)
        tensortap.close()
        assert tensortap.stats()["errors"] == 0 and tensortap.stats()["graph_skipped"] == 0
    assert_same_dumps(dumps["eager"], dumps["graph"])
    if mode == "stats":
        ra, rb = run_records(dumps["eager"]), run_records(dumps["graph"])
        assert all(ra[k][0]["stats"] == rb[k][0]["stats"] for k in ra)
    verdicts = [[v.name for v in tensortap.check(dumps[k]).verdicts] for k in ("eager", "graph")]
    assert verdicts[0] == verdicts[1]


@gpu
@needs_4
@pytest.mark.parametrize("fixed", [False, True])
def test_reference_cuda_graph_on_4_gpus_gives_the_eager_verdict(tmp_path, fixed):
    dumps = {}
    for label, graph in (("eager", False), ("graph", True)):
        scn = Scenario(steps=2, spec_tokens=1, fixed=fixed, static_shapes=True, cuda_graph=graph)
        dumps[label] = str(tmp_path / label)
        spawn(run_rank, 4, backend="nccl", workdir=str(tmp_path), timeout=300,
              kwargs=dict(scenario=dataclasses.asdict(scn), tap_dir=dumps[label]))
    assert_same_dumps(dumps["eager"], dumps["graph"])
    verdicts = [[v.name for v in tensortap.check(dumps[k]).verdicts] for k in ("eager", "graph")]
    assert verdicts[0] == verdicts[1] == ([] if fixed else ["laundered consensus"])
