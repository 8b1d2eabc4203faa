"""The plugin under vLLM's default serving modes, on the CPU: engine steps and start-up phases, breakable
PIECEWISE graphs and FULL graphs, with vLLM 0.33.0's real graph classes and capture faked.

Real: BreakableCUDAGraphWrapper, BreakableCUDAGraphCapture (its segments and eager breaks), CUDAGraphWrapper,
the forward context and BatchDescriptor, DeepseekV32Attention and the rest of tests/vllm_cpu.py, and the
Model Runner V2 class GPUModelRunner whose methods the plugin wraps. Faked: torch.cuda.CUDAGraph (a graph
whose replay runs no kernels, hooked by tensortap's graph runtime as the real class is on a GPU),
torch.cuda.graph and the capture stream, the graph pool, weak_ref_tensor (a CUDA op), "is the stream
capturing" (the graph runtime's registry answers), and the bodies of the runner's execute_model,
sample_tokens, _dummy_run, profile_run and capture_model (drivers that make the calls vLLM makes: they
need CUDA and a loaded model).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import vllm_cpu as V  # noqa: E402  (imports vLLM, or skips/fails where it is expected)

import tensortap  # noqa: E402
from tensortap.capture import graphs, runtime  # noqa: E402
from tensortap.integrations import vllm as plugin  # noqa: E402
from tensortap.integrations.vllm import patching, state  # noqa: E402
from vllm.compilation import breakable_cudagraph, cuda_graph, monitor  # noqa: E402
from vllm.config import CUDAGraphMode  # noqa: E402
from vllm.forward_context import BatchDescriptor, set_forward_context  # noqa: E402
from vllm.models.common.ops import fused_allreduce_rms_norm as far  # noqa: E402
from vllm.v1.worker.gpu import model_runner  # noqa: E402

EAGER_POINTS = ["block_table", "q", "topk", "slots", "kv_pages", "partial_out", "lse", "merged_out", "attn_out"]


class FakeGraph:
    """torch.cuda.CUDAGraph without CUDA: capture and replay run no kernels."""

    def capture_begin(self, *args, **kwargs):
        pass

    def capture_end(self):
        pass

    def replay(self):
        pass


@contextlib.contextmanager
def fake_graph_context(graph, pool=None, stream=None, **kwargs):
    """torch.cuda.graph(graph): capture_begin ... capture_end on the capture stream."""
    graph.capture_begin()
    try:
        yield
    finally:
        graph.capture_end()


class Driver:
    """GPUModelRunner's methods reduced to the calls the plugin sees (the real ones need CUDA and a model)."""

    def execute_model(self, scheduler_output, intermediate_tensors=None, dummy_run=False, **kwargs):
        mode = CUDAGraphMode.NONE if dummy_run or not self.captured else self.mode
        return self.forward(self.target, mode)

    def sample_tokens(self, grammar_output=None):
        return self.forward(self.draft, CUDAGraphMode.NONE)  # the drafter's pass, eager

    def _dummy_run(self, num_tokens, *args, **kwargs):
        return self.execute_model(None, dummy_run=True)

    def profile_run(self, randomize_inputs=False):
        self._dummy_run(3, is_profile=True)

    def capture_model(self, **kwargs):
        self._dummy_run(3)  # warm-up forward of the graph size, eager
        self.forward(self.target, self.mode)  # the wrapper captures: no entry for this batch yet
        self.captured = True
        return 0


def _forward(runner, model, mode):
    """One model call under vLLM's forward context (decode batch of 3 tokens, the runner's graph mode)."""
    layer = model.layer if isinstance(model, Decoder) else model.runnable.layer
    layer.kv_cache = runner.cache
    with set_forward_context({layer.layer_name: runner.md}, runner.config, cudagraph_runtime_mode=mode,
                             batch_descriptor=BatchDescriptor(num_tokens=3),
                             slot_mapping={layer.layer_name: runner.md.slot_mapping}):
        return model(V.SEQ_LENS.long() - 1, runner.hidden)


class Decoder(torch.nn.Module):
    """A decoder layer's attention and the post-attention all-reduce + RMSNorm."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, positions, hidden):
        partial = self.layer(positions, hidden)  # [T, C]
        normed, _ = far.fused_allreduce_rms_norm(partial, torch.zeros_like(partial), V._Norm())
        return normed


def scheduled(step: int):
    from types import SimpleNamespace

    return SimpleNamespace(total_num_scheduled_tokens=3, num_scheduled_tokens={f"req-{step}-{i}": 1 for i in range(3)})


@pytest.fixture
def serving(monkeypatch, tap_dir):
    """Fakes in place (kernels, graphs, runner bodies), TAP set, register() run; builds a runner."""
    monkeypatch.setattr(state, "WARNED", set())
    V.install_fakes(monkeypatch)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph_context)
    monkeypatch.setattr(cuda_graph, "current_stream", lambda: None)
    for module in (cuda_graph, breakable_cudagraph):
        monkeypatch.setattr(module, "capture_pool", lambda pool, config: contextlib.nullcontext(None))
        monkeypatch.setattr(module, "weak_ref_tensors", lambda x: x)
    monkeypatch.setattr(breakable_cudagraph, "weak_ref_tensor", lambda x: x)
    monkeypatch.setattr("vllm.utils.torch_utils.weak_ref_tensor", lambda x: x)
    monkeypatch.setattr(breakable_cudagraph.current_platform, "get_global_graph_pool", lambda: None)
    monkeypatch.setattr(cuda_graph.current_platform, "get_global_graph_pool", lambda: None)
    monkeypatch.setattr(monitor, "cudagraph_capturing_enabled", True)
    monkeypatch.setattr(state, "capturing", lambda: runtime._tap is not None and runtime._tap.graphs.capturing()
                        is not None)
    for name in ("execute_model", "sample_tokens", "_dummy_run", "profile_run", "capture_model"):
        monkeypatch.setattr(model_runner.GPUModelRunner, name, getattr(Driver, name))
    monkeypatch.setenv("TAP", tap_dir)
    plugin.register()
    graphs.install(FakeGraph, runtime._GRAPH_HOOKS)
    V.block_table()

    def build(mode: CUDAGraphMode, breakable: bool):
        runner = object.__new__(model_runner.GPUModelRunner)
        runner.config = V.vllm_config(V.target_parallel())
        runner.mode, runner.captured = mode, False
        runner.md, runner.cache = V.make_metadata(), V.make_cache()
        runner.hidden = torch.randn(3, V.HIDDEN, generator=torch.Generator().manual_seed(1))  # [T, C]
        target = Decoder(V.make_layer(runner.config, 3))
        if mode == CUDAGraphMode.NONE:  # --enforce-eager
            runner.target = target
        elif breakable:
            runner.target = breakable_cudagraph.BreakableCUDAGraphWrapper(target, runner.config)
        else:
            runner.target = cuda_graph.CUDAGraphWrapper(target, runner.config, mode)
        runner.draft = Decoder(V.make_layer(runner.config, V.NUM_LAYERS))  # the MTP layer
        runner.forward = lambda model, run_mode: _forward(runner, model, run_mode)
        return runner

    yield build
    graphs.uninstall(FakeGraph)
    plugin.unregister()
    tensortap.close()


def serve(runner, steps: int = 3) -> None:
    """vLLM's start-up (profile, capture), then `steps` decode steps, each with its draft pass."""
    runner.profile_run()
    runner.capture_model()
    for step in range(steps):
        runner.execute_model(scheduled(step))
        runner.sample_tokens()


def test_start_up_is_not_recorded_and_steps_are_the_engines(serving, tap_dir):
    """Eager serving (graph mode NONE): profile and capture forwards record nothing; each execute_model is
    one engine step, its draft pass (sample_tokens) belongs to the same step; request ids recorded."""
    runner = serving(CUDAGraphMode.NONE, breakable=False)
    serve(runner)
    tensortap.close()
    rows = tensortap.open(tap_dir).records
    assert sorted(set(rows.step)) == [0, 1, 2] and set(rows.phase) == {"run"}
    assert set(zip(rows.role, rows.layer)) == {("target", 3), ("draft", V.NUM_LAYERS)}
    d = tensortap.open(tap_dir)
    for step in range(3):
        for role in ("target", "draft"):
            rec = d.record("lse", step=step, role=role)
            assert rec.meta["req_ids"] == [f"req-{step}-{i}" for i in range(3)] and rec.meta["num_tokens"] == 3
            assert rec.meta["spec_pos"] == 0
    assert not state.WARNED


def test_breakable_piecewise_graphs_record_replayed_steps(serving, tap_dir):
    """Breakable PIECEWISE graphs: the eager region's points record at every replay (vLLM calls the region
    directly), o_proj_partial and hidden come from graph slots drained after the replayed segments; the
    capture itself records nothing."""
    runner = serving(CUDAGraphMode.PIECEWISE, breakable=True)
    serve(runner)
    wrapper = runner.target
    assert len(wrapper.entries) == 1 and next(iter(wrapper.entries.values())).capture.num_eager_breaks == 1
    tensortap.close()
    d = tensortap.open(tap_dir)
    rows = d.records
    assert set(rows.phase) == {"run"} and sorted(set(rows.step)) == [0, 1, 2]
    target = rows[rows.role == "target"]
    for step in range(3):
        points = list(target[target.step == step].point)
        assert sorted(points) == sorted(EAGER_POINTS + ["o_proj_partial", "hidden"]), (step, points)
    slot = d.record("hidden", step=2, role="target")
    assert slot.meta.get("graph") is not None and slot.meta["req_ids"] == ["req-2-0", "req-2-1", "req-2-2"]
    assert d.record("q", step=2, role="target").meta.get("graph") is None  # recorded eagerly at replay
    assert not state.WARNED


def test_full_graphs_record_every_point_from_slots(serving, tap_dir):
    """FULL graphs (FULL_AND_PIECEWISE decode): every point met during capture becomes a graph slot (kv_pages
    excepted: its shape depends on the data), stamped at each replay with the engine's step."""
    runner = serving(CUDAGraphMode.FULL, breakable=False)
    serve(runner)
    tensortap.close()
    rows = tensortap.open(tap_dir).records
    assert set(rows.phase) == {"run"} and sorted(set(rows.step)) == [0, 1, 2]
    target = rows[rows.role == "target"]
    expected = [p for p in EAGER_POINTS if p != "kv_pages"] + ["o_proj_partial", "hidden"]
    for step in range(3):
        assert sorted(target[target.step == step].point) == sorted(expected)
    assert target.graph.notna().all() if "graph" in target else True
    assert not state.WARNED


def test_tap_unset_patches_no_graph_class(monkeypatch):
    monkeypatch.delenv("TAP", raising=False)
    before = (cuda_graph.CUDAGraphWrapper.__call__, breakable_cudagraph.BreakableCUDAGraphWrapper._replay,
              breakable_cudagraph.BreakableCUDAGraphCapture.add_eager, model_runner.GPUModelRunner.execute_model)
    plugin.register()
    after = (cuda_graph.CUDAGraphWrapper.__call__, breakable_cudagraph.BreakableCUDAGraphWrapper._replay,
             breakable_cudagraph.BreakableCUDAGraphCapture.add_eager, model_runner.GPUModelRunner.execute_model)
    assert after == before and patching.PATCHES == []


def test_draft_passes_restart_at_each_engine_step_when_the_target_runs_in_a_full_graph():
    """A FULL-graph target runs no layer Python: the draft count must restart at the engine's step."""
    from tensortap.integrations.vllm import layers, state

    saved = state.ENGINE.save()
    steps = layers._Steps()
    draft = layers._Layer(78, "draft", mtp=True)
    try:
        state.ENGINE.phase = "run"
        seen = []
        for engine_step in range(3):
            state.ENGINE.step = engine_step
            seen.append([steps.enter(draft)[1] for _ in range(2)])  # two MTP passes; no target layer call
        assert seen == [[0, 1], [0, 1], [0, 1]]
    finally:
        state.ENGINE.restore(saved)
