"""CUDA-graph slots on the CPU: the capture/replay hooks driven by a fake graph class.

A fake graph's capture_begin/capture_end/replay are hooked exactly as torch.cuda.CUDAGraph's are;
its "kernels" (what a real replay would recompute) write new values into the slot buffers."""

import logging
import os
import subprocess
import sys
import threading

import pytest
import torch

import tensortap
from tensortap.capture import graphs, runtime, trigger


class FakeGraph:
    def __init__(self):
        self.kernels = lambda: None

    def capture_begin(self, *args, **kwargs):
        pass

    def capture_end(self):
        pass

    def replay(self):
        self.kernels()


@pytest.fixture
def hooked():
    graphs.install(FakeGraph, runtime._GRAPH_HOOKS)
    yield FakeGraph
    graphs.uninstall(FakeGraph)


def capture(graph, tokens=4, width=8, points=("hidden",), layer=3, **scope):
    """Capture `points` into `graph` (warm-up style scope); returns the slot buffers by point."""
    graph.capture_begin()
    with tensortap.scope(step=-1, role="target", phase="capture", **scope):
        for point in points:
            tensortap.point(f"layers.{layer}.attn.{point}", torch.zeros(tokens, width))
    graph.capture_end()
    entry = runtime._tap.graphs._graphs.get(id(graph))
    return {slot.point: slot.buffers for slot in entry.slots} if entry else {}


def test_replays_record_the_replayed_values_with_the_replay_step(tap_dir, hooked):
    tensortap.configure(dir=tap_dir)
    g = FakeGraph()
    slots = capture(g, tokens=4)
    assert tensortap.stats()["records"] == 0 and len(slots) == 1, "capture records a slot, not a record"
    values = [torch.full((4, 8), float(s)) + torch.arange(8.0) for s in range(3)]  # [4, 8] per step
    for step in range(3):
        g.kernels = lambda s=step: slots["hidden"]["data"].copy_(values[s])
        with tensortap.scope(step=step + 100, role="target", spec_pos=None, num_tokens=3, req_ids=["a", "b", "c"]):
            g.replay()
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert d.steps == [100, 101, 102]
    for step in range(3):
        rec = d.record("hidden", step=step + 100)
        assert torch.equal(rec.tensor(), values[step][:3]), "padding rows past num_tokens are trimmed"
        assert rec.meta["phase"] == "run" and rec.meta["num_tokens"] == 3 and rec.meta["req_ids"] == ["a", "b", "c"]
        assert rec.meta["graph"] == 0 and rec.layer == 3 and rec.role == "target"


def test_two_graphs_keep_their_slots_apart(tap_dir, hooked):
    tensortap.configure(dir=tap_dir)
    small, big = FakeGraph(), FakeGraph()
    s1 = capture(small, tokens=2)
    s2 = capture(big, tokens=8)
    small.kernels = lambda: s1["hidden"]["data"].fill_(1.0)
    big.kernels = lambda: s2["hidden"]["data"].fill_(2.0)
    with tensortap.scope(step=0, role="target"):
        big.replay()
    with tensortap.scope(step=1, role="target"):
        small.replay()
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert d.record("hidden", step=0).tensor().shape == (8, 8) and float(d.get("hidden", step=0)[0, 0]) == 2.0
    assert d.record("hidden", step=1).tensor().shape == (2, 8) and float(d.get("hidden", step=1)[0, 0]) == 1.0
    assert {r.meta["graph"] for r in d} == {0, 1}


def test_a_recapture_replaces_the_slots_and_the_filter_applies_at_replay(tap_dir, hooked):
    tensortap.configure(dir=tap_dir, steps="5-6", points="hidden,lse")
    g = FakeGraph()
    capture(g, points=("hidden", "q"))  # q is filtered out by its name, at capture
    slots = capture(g, points=("hidden", "lse"))  # the same graph captured again
    assert sorted(slots) == ["hidden", "lse"]
    for step in range(4, 8):
        with tensortap.scope(step=step, role="draft", spec_pos=1):
            g.replay()
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert d.steps == [5, 6] and sorted(d.points) == ["hidden", "lse"] and len(d) == 4
    assert {(r.meta["spec_pos"], r.role) for r in d} == {(1, "draft")}, "the host scope at replay wins"


def test_the_graph_budget_stops_slots_with_one_message(tap_dir, hooked, caplog):
    tensortap.configure(dir=tap_dir, graph_bytes=200)
    g = FakeGraph()
    with caplog.at_level(logging.ERROR, logger="tensortap"):
        slots = capture(g, tokens=4, width=8, points=("hidden", "lse", "q"))  # 128 bytes each
    assert sorted(slots) == ["hidden"]
    with tensortap.scope(step=0):
        g.replay()
    tensortap.close()
    counters = tensortap.stats()
    assert counters["graph_skipped"] == 2 and counters["records"] == 1
    assert len([r for r in caplog.records if "graph_bytes" in r.getMessage()]) == 1


def test_scope_tensor_metadata_inside_the_capture_is_replayed(tap_dir, hooked):
    """A tensor given to a scope inside the capture is snapshotted once into a slot: replays carry its values."""
    tensortap.configure(dir=tap_dir)
    g = FakeGraph()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # scope tensors travel with points on their device
    lens = torch.tensor([5, 7], device=device)
    g.capture_begin()
    with tensortap.scope(step=-1, role="target", seq_lens=lens):
        tensortap.point("layers.0.attn.lse", torch.zeros(2, 4, device=device))  # [T, H]
    g.capture_end()
    with tensortap.scope(step=0):
        g.replay()
    tensortap.close()
    assert tensortap.open(tap_dir).record("lse").meta["seq_lens"] == [5, 7]


def test_wants_inside_a_capture_ignores_the_step():
    tensortap.configure(dir="/tmp/unused-tap", steps="100")
    graphs.install(FakeGraph, runtime._GRAPH_HOOKS)
    try:
        g = FakeGraph()
        assert not tensortap.wants("layers.0.attn.q", step=0)
        g.capture_begin()
        assert tensortap.wants("layers.0.attn.q", step=0), "the step is known only at replay"
        g.capture_end()
    finally:
        graphs.uninstall(FakeGraph)
        tensortap.configure()


HOOKED = "import torch, tensortap; tensortap.point; print(hasattr(torch.cuda.CUDAGraph.replay, '__wrapped__'))"


@pytest.mark.parametrize("tap, patched", [("", "False"), ("{dir}", "True")])
def test_cuda_graph_is_patched_only_when_tap_is_set(tmp_path, tap, patched):
    env = dict(os.environ, TAP=tap.format(dir=tmp_path / "t"))
    done = subprocess.run([sys.executable, "-c", HOOKED], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == patched, done.stderr


def test_a_replay_without_a_step_is_not_shown_as_a_real_step(tap_dir, hooked):
    """A replay outside any scope that gives the step: the record keeps the capture's dummy step, so it
    is marked phase=capture (readers exclude it by default) instead of passing for a real step."""
    tensortap.configure(dir=tap_dir)
    g = FakeGraph()
    slots = capture(g, tokens=4)
    g.kernels = lambda: slots["hidden"]["data"].fill_(7.0)
    g.replay()  # no scope at all
    with tensortap.scope(step=5, role="target"):
        g.replay()
    tensortap.close()
    assert tensortap.open(tap_dir).steps == [5], "only the replay that was given its step is a run"
    everything = tensortap.open(tap_dir, phases="all")
    assert sorted((r.step, r.meta["phase"]) for r in everything) == [(-1, "capture"), (5, "run")]


def test_a_failing_hook_never_raises_into_the_engines_capture_or_replay(tap_dir, hooked, monkeypatch):
    tensortap.configure(dir=tap_dir)

    def broken(graph):
        raise RuntimeError("registry broken")

    for what in ("begin", "end", "before_replay"):
        monkeypatch.setattr(runtime._tap.graphs, what, broken)
    g = FakeGraph()
    g.capture_begin()
    g.capture_end()
    g.replay()
    assert tensortap.stats()["errors"] == 3
    tensortap.close()


def test_graph_stats_cover_only_the_real_rows(tap_dir, hooked, monkeypatch):
    """mode=stats inside a graph: the slots hold per-row partials (device_stats, forced on the CPU here),
    and a replay with num_tokens=n gets the stats of rows < n only: NaN and inf in the padding rows
    reach neither nonfinite nor absmax nor the hash, nor the per-head arrays."""
    from tensortap.capture import device_stats
    from tensortap.format import stats as host_stats

    tensortap.configure(dir=tap_dir, mode="stats")
    monkeypatch.setattr(runtime._tap, "_keeps_data", lambda tensor: False)  # the device path, on the CPU
    g = FakeGraph()
    g.capture_begin()
    with tensortap.scope(step=-1, role="target", phase="capture"):
        tensortap.point("layers.3.attn.hidden", torch.zeros(6, 8))  # [T, W]: rows 4 and 5 are padding
        tensortap.point("layers.3.attn.merged_out", torch.zeros(6, 2, 4))  # [T, H, D]
    g.capture_end()
    slots = {slot.point: slot.buffers for slot in runtime._tap.graphs._graphs[id(g)].slots}
    assert "rows:buckets" in slots["hidden"] and "data" not in slots["hidden"]
    hidden, merged = torch.randn(6, 8), torch.randn(6, 2, 4)
    merged[:4, 1] = 0.0  # head 1 is zero in every real row
    for x in (hidden, merged):
        x[4:] = float("nan")
        x[5].view(-1)[0] = float("inf")

    def kernels():  # what the replay recomputes into the slots
        for point, x in (("hidden", hidden), ("merged_out", merged)):
            for key, value in device_stats.partials(x, point, rows=True).items():
                slots[point][key].copy_(value)

    g.kernels = kernels
    with tensortap.scope(step=7, role="target", num_tokens=4):
        g.replay()
    with tensortap.scope(step=8, role="target"):  # no num_tokens: every row counts
        g.replay()
    tensortap.close()
    d = tensortap.open(tap_dir)
    for point, x in (("hidden", hidden), ("merged_out", merged)):
        rec = d.record(point, step=7)
        want, want_array = host_stats.compute(x[:4].numpy(), "float32", point, keep_arrays=True)
        assert rec.meta["shape"] == [4] + list(x.shape[1:]) and not rec.stored
        assert rec.stats["nonfinite"] == 0 and rec.stats["absmax"] == want["absmax"]
        assert rec.stats.get("hash") == want.get("hash") and rec.stats.get("zero_heads") == want.get("zero_heads")
        if want_array is not None:
            assert rec.stats_array().shape == (4, 2) and list(rec.stats_array()["zeros"][:, 1]) == [4] * 4
        assert d.record(point, step=8).stats["nonfinite"] == x[4:].numel()


def test_a_trigger_in_a_graph_watches_the_real_rows_only(tap_dir, hooked):
    """trigger=nonfinite on a replayed point: NaN in the padding rows past num_tokens fires nothing; NaN in
    a real row fires, and the dump then holds that step and the trigger record."""
    tensortap.configure(dir=tap_dir, trigger="nonfinite", ring=1, trigger_steps=0)
    g = FakeGraph()
    slots = capture(g, tokens=6, width=8, points=("hidden",))
    assert "signal:rows" in slots["hidden"]
    x = torch.randn(6, 8)  # [T, W]: rows 4 and 5 are padding

    def kernels():  # what the replay recomputes into the slots
        slots["hidden"]["data"].copy_(x)
        slots["hidden"]["signal:rows"].copy_(trigger.row_signal("nonfinite", x))

    g.kernels = kernels
    x[4:] = float("nan")
    for step in range(4):
        with tensortap.scope(step=step, role="target", num_tokens=4):
            g.replay()
    x[1, 3] = float("nan")  # a real row
    for step in range(4, 8):
        with tensortap.scope(step=step, role="target", num_tokens=4):
            g.replay()
    tensortap.close()
    d = tensortap.open(tap_dir)
    fired = [r.meta["trigger"] for r in d if r.point == "trigger"]
    assert {f["trigger"] for f in fired} == {"nonfinite"}
    assert sorted(f["step"] for f in fired) == [4, 5, 6, 7], "padding NaN (steps 0-3) fired nothing"
    assert min(r.step for r in d if r.point != "trigger") == 3, "of the padding-only steps, only the ring's"


def replay_sequence(directory, mode, per_replay, monkeypatch):
    """Capture a target and a draft point, then replay: step 5 (its draft filtered out), step 6 (trimmed
    to 3 rows), a replay with no step, step 7 with every row. Returns the dump."""
    from tensortap.capture import device_stats

    tensortap.configure(dir=directory, mode=mode, steps="5-7", roles="target" if mode == "full" else None)
    if not per_replay:
        runtime._tap._lean_config = False  # every replay's records made on the model's thread
    with tensortap.scope(step=5, role="target"):  # the writer starts: later replays may be handed over whole
        tensortap.point("layers.3.attn.lse", torch.ones(2, 2))
    if mode == "stats":
        monkeypatch.setattr(runtime._tap, "_keeps_data", lambda tensor: False)  # the device path, on the CPU
    g = FakeGraph()
    g.capture_begin()
    with tensortap.scope(step=-1, phase="capture"):
        with tensortap.scope(role="target"):
            tensortap.point("layers.3.attn.merged_out", torch.zeros(5, 2, 4), head_offset=2)  # [T, H, D]
        with tensortap.scope(role="draft", spec_pos=0):
            tensortap.point("layers.3.attn.topk", torch.zeros(5, 6, dtype=torch.int32))  # [T, K]
    g.capture_end()
    slots = {slot.point: slot.buffers for slot in runtime._tap.graphs._graphs[id(g)].slots}
    for step, tokens in ((5, None), (6, 3), (None, None), (7, None)):
        merged = torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(step or 0))  # [T, H, D]
        merged[4] = float("nan")
        topk = torch.arange(30, dtype=torch.int32).view(5, 6) - 10  # [T, K]

        def kernels(merged=merged, topk=topk):
            for point, x in (("merged_out", merged), ("topk", topk)):
                if "data" in slots[point]:
                    slots[point]["data"].copy_(x)
                else:
                    for key, value in device_stats.partials(x, point, rows=True).items():
                        slots[point][key].copy_(value)

        g.kernels = kernels
        scope = {k: v for k, v in (("step", step), ("num_tokens", tokens)) if v is not None}
        with tensortap.scope(**scope, req_ids=[1, 2, 3]):
            g.replay()
    tensortap.close()
    return tensortap.open(directory, phases="all")


@pytest.mark.parametrize("mode", ["full", "stats"])
def test_a_replay_handed_over_whole_writes_the_records_made_one_by_one(tmp_path, hooked, mode, monkeypatch):
    from tensortap.capture.tap import Tap
    from tensortap.format import schema

    splits = []
    original = Tap.split_replay
    monkeypatch.setattr(Tap, "split_replay", lambda self, job: splits.append(1) or original(self, job))
    whole = replay_sequence(str(tmp_path / "whole"), mode, True, monkeypatch)
    assert len(splits) >= 3, "the replays took the hand-over of whole replays"
    count = len(splits)
    one_by_one = replay_sequence(str(tmp_path / "each"), mode, False, monkeypatch)
    assert len(splits) == count
    skip = set(schema.LOCATION_FIELDS) | {"time_ns"}
    a = sorted(whole, key=lambda r: r.meta["seq"])
    b = sorted(one_by_one, key=lambda r: r.meta["seq"])
    assert [(r.point, r.step, r.role) for r in a] == [(r.point, r.step, r.role) for r in b]
    assert {(r.point, r.step) for r in a if r.point != "lse"} >= {("merged_out", 5), ("merged_out", 6), ("merged_out", 7)}
    if mode == "full":
        assert not any(r.role == "draft" for r in a), "the filter drops the draft slot at each replay"
    for x, y in zip(a, b):
        assert {k: v for k, v in x.meta.items() if k not in skip} == {k: v for k, v in y.meta.items() if k not in skip}
        if x.stored:
            assert x.tensor().numpy().tobytes() == y.tensor().numpy().tobytes()
        elif x.stats_array() is not None:
            assert x.stats_array().tobytes() == y.stats_array().tobytes()
    trimmed = next(r for r in a if r.point == "merged_out" and r.step == 6)
    assert trimmed.meta["shape"] == [3, 2, 4] and trimmed.meta["num_tokens"] == 3


def test_a_replay_lost_or_dropped_counts_each_of_its_records(tmp_path):
    """A Replay is one item in the writer's queue but holds a record per kept slot: losses count those."""
    from tensortap.capture import writer as writer_module
    from tensortap.capture.job import Replay, record_count
    from tensortap.capture.staging import Staged, Stager

    packed = torch.zeros(64, dtype=torch.uint8)  # [total]
    replay = Replay(None, [("slot", 1), ("slot", 2), ("slot", 3)], {}, 0, 0, Staged({"packed": packed}))
    assert record_count([replay, (None,) * 8]) == 4 and replay.nbytes == 64
    counters = writer_module.Counters()
    never = threading.Event()  # the writer thread waits for its sink for ever: the queue stays as the test leaves it
    writer = writer_module.Writer(never.wait, Stager(), 100, "drop", counters)
    writer.failed = OSError("gone")
    writer.submit([replay])
    assert counters.lost == 3
    writer.failed = None
    writer._queue.append(writer_module._Batch([], 90))  # the queue is nearly full
    writer._queued_bytes = 90
    writer.submit([replay])
    assert counters.dropped == 3


def test_slots_past_the_first_arena_chunk_replay_exactly(tap_dir, hooked):
    """Slots fill the graph's arena chunk by chunk (64 KiB, then doubling); each replay drains all."""
    tensortap.configure(dir=tap_dir)
    g = FakeGraph()
    sizes = {"q": (40, 256), "partial_out": (3, 7), "merged_out": (100, 256), "hidden": (5, 3)}  # fp32
    g.capture_begin()
    with tensortap.scope(step=-1, role="target", phase="capture"):
        for point, shape in sizes.items():
            tensortap.point(f"layers.3.attn.{point}", torch.zeros(shape))
    g.capture_end()
    entry = runtime._tap.graphs._graphs[id(g)]
    assert [c.numel() for c in entry.chunks] == [graphs.MIN_CHUNK, 2 * graphs.MIN_CHUNK]
    buffers = {slot.point: slot.buffers["data"] for slot in entry.slots}
    assert all(entry.holds(b) for b in buffers.values())
    want = {}
    for step in range(3):
        want[step] = {p: torch.randn(shape) for p, shape in sizes.items()}
        g.kernels = lambda s=step: [buffers[p].copy_(want[s][p]) for p in sizes]
        with tensortap.scope(step=step, role="target"):
            g.replay()
    tensortap.close()
    d = tensortap.open(tap_dir)
    for step in range(3):
        for point in sizes:
            assert torch.equal(d.get(point, step=step), want[step][point]), (step, point)


def test_the_drain_plan_places_arena_views_and_loose_buffers_once_each():
    """Buffers outside the arena (scope snapshots made before the capture) are drained too, once however
    many slots share them; past MAX_COPIES parts the plan is packed by one cat of aligned pieces."""
    from tensortap.capture.writer import Counters

    registry = graphs.Registry(1 << 30, lambda *a: None, Counters())
    g = FakeGraph()
    registry.begin(g)
    entry = registry.capturing()
    shared = torch.arange(3, dtype=torch.int64)  # [3]: one loose buffer in every slot
    expected = []
    for i in range(graphs.MAX_COPIES + 4):
        data = entry.empty(torch.device("cpu"), (i + 1,), torch.float32).copy_(torch.arange(i + 1.0))
        loose = torch.full((i % 5 + 1,), i, dtype=torch.int16)  # odd byte counts: aligned in the plan
        buffers = {"data": data, "meta:own": loose, "meta:shared": shared}
        registry.add(entry, f"layers.0.attn.p{i}", "hidden", {}, buffers)
        expected.append({k: v.clone() for k, v in buffers.items()})
    registry.end(g)
    assert len(entry.parts) == 1 + graphs.MAX_COPIES + 4 + 1 and entry.padded is not None
    assert all(start % graphs.ALIGN == 0 for _, start in entry.parts)
    drained = registry.drain(g)
    for (slot, tensors), want in zip(drained, expected):
        assert slot.offsets["meta:shared"] == drained[0][0].offsets["meta:shared"]
        for key in want:
            assert torch.equal(tensors[key], want[key]), (slot.name, key)


def test_the_writer_yields_the_gil_at_the_gpu_pace_once_a_graph_slot_is_made(tap_dir, hooked, monkeypatch):
    from tensortap.capture import job

    monkeypatch.setattr(job, "_yield_ns", job.YIELD_NS)
    tensortap.configure(dir=tap_dir)
    with tensortap.scope(step=0, layer=3):
        tensortap.point("layers.3.attn.hidden", torch.zeros(4, 8))
    tensortap.flush()
    assert job._yield_ns == job.YIELD_NS, "CPU records keep the CPU pace"
    capture(FakeGraph())
    assert job._yield_ns == job.GPU_YIELD_NS < job.YIELD_NS
    tensortap.close()
    tensortap.configure(dir=tap_dir)
    assert job._yield_ns == job.YIELD_NS, "a new tap starts at the CPU pace"
    tensortap.close()
