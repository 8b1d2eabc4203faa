"""The engine side of the plugin: which forwards are real, and what the engine used for them.

- Steps and phases. `execute_model` of a real batch is one engine step: its forwards (and the draft
  forwards of the `sample_tokens` that follows it) run in `scope(step, phase="run", role, req_ids,
  num_tokens)`. `_dummy_run` and `profile_run` are `phase="warmup"`, `capture_model` (and Model Runner
  V2's graph manager's `capture`) `phase="capture"`: layers record nothing there, except points that
  feed a graph slot while a graph is being captured (tensortap's graph runtime).
- CUDA graphs. Replays are held in the step's scope, so that graph slots drained after a replay are
  stamped with the engine's step (V1's CUDAGraphWrapper.__call__, Model Runner V2's run_fullgraph,
  BreakableCUDAGraphWrapper._replay); captures are `phase="capture"`. A breakable (PIECEWISE) graph
  replays DeepseekV32Attention's eager region by calling it directly: add_eager wraps what it records so
  that each replay opens the layer's forward and its inner points record as in eager mode.
- The cache writer. The block table whose slot mapping writes the KV cache gives kv_dcp_size, its rank
  and interleave (Model Runner V2: BlockTables.cp_size/cp_rank/cp_interleave, from parallel_config;
  V1: BlockTable.dcp_world_size/dcp_rank/cp_kv_cache_interleave_size, from the process group).
- Local lengths. The sparse metadata builder is given the model runner's dcp_local_seq_lens (the
  lengths the indexer's kernels get); they ride on the metadata it builds as local_seq_lens.
"""

from __future__ import annotations

import functools
import inspect

import tensortap
from tensortap.integrations.vllm import layers
from tensortap.integrations.vllm.points import _tap_attn_out
from tensortap.integrations.vllm.state import EAGER_LAYER, ENGINE, WRITER, guarded


class _Phase:
    """Sets ENGINE's fields and holds `tensortap.scope(**meta)` while a runner call runs; restores both."""

    __slots__ = ("fields", "meta", "saved", "scope")

    def __init__(self, fields: dict, meta: dict):
        self.fields, self.meta = fields, meta

    def __enter__(self):
        self.saved = ENGINE.save()
        for key, value in self.fields.items():
            setattr(ENGINE, key, value)
        self.scope = tensortap.scope(**self.meta)
        self.scope.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self.scope.__exit__(*exc)
        finally:
            ENGINE.restore(self.saved)


def _startup(phase: str) -> _Phase | None:
    """A start-up forward: inside another one (a warm-up within capture_model) it keeps the outer phase."""
    if ENGINE.phase in ("warmup", "capture"):
        return None
    return _Phase(dict(phase=phase), dict(phase=phase))


def _held(make_phase):
    """Runner-method wrapper factory: the call runs inside `make_phase(signature, args, kwargs)`'s phase
    (None: as it is)."""

    def make(original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            held = guarded(make_phase, signature, args, kwargs)
            if held is None:
                return original(*args, **kwargs)
            with held:
                return original(*args, **kwargs)
        return wrapper
    return make


def _execute_phase(signature, args, kwargs) -> _Phase | None:
    """execute_model: a real batch is the next engine step (target role); a dummy one is a warm-up."""
    if ENGINE.phase in ("warmup", "capture"):
        return None
    arguments = signature.bind_partial(*args, **kwargs).arguments
    if arguments.get("dummy_run"):
        return _startup("warmup")
    scheduled = arguments.get("scheduler_output")
    tokens = getattr(scheduled, "total_num_scheduled_tokens", 0)
    if not tokens:
        return None  # nothing runs the model this step
    ENGINE.step += 1
    ENGINE.req_ids = [str(r) for r in (getattr(scheduled, "num_scheduled_tokens", None) or {})]
    ENGINE.num_tokens = int(tokens)
    return _Phase(dict(phase="run", role="target", replays=0),
                  dict(step=ENGINE.step, phase="run", role="target", spec_pos=0, req_ids=ENGINE.req_ids,
                       num_tokens=ENGINE.num_tokens))


def _sample_phase(signature, args, kwargs) -> _Phase | None:
    """sample_tokens: the draft forwards that follow a step belong to it (role draft)."""
    if ENGINE.phase in ("warmup", "capture"):
        return _Phase(dict(role="draft"), {})
    if ENGINE.step < 0:
        return None
    return _Phase(dict(phase="run", role="draft", replays=0),
                  dict(step=ENGINE.step, phase="run", role="draft", req_ids=ENGINE.req_ids,
                       num_tokens=ENGINE.num_tokens))


wrap_execute_model = _held(_execute_phase)
wrap_sample_tokens = _held(_sample_phase)
wrap_warmup = _held(lambda signature, args, kwargs: _startup("warmup"))  # _dummy_run, profile_run
wrap_capture = _held(lambda signature, args, kwargs: _startup("capture"))  # capture_model, graph capture


def _replay() -> _Phase | None:
    """A graph replay during a step: the step's scope (draft replays count spec_pos)."""
    if ENGINE.phase != "run":
        return None
    spec_pos = ENGINE.replays if ENGINE.role == "draft" else 0
    ENGINE.replays += 1
    return _Phase({}, dict(step=ENGINE.step, phase="run", role=ENGINE.role, spec_pos=spec_pos,
                           req_ids=ENGINE.req_ids, num_tokens=ENGINE.num_tokens))


wrap_replay = _held(lambda signature, args, kwargs: _replay())  # run_fullgraph, BreakableCUDAGraphWrapper._replay


def _wrapper_call(signature, args, kwargs) -> _Phase | None:
    """CUDAGraphWrapper.__call__ (V1): capture when its entry for this batch has no graph yet, else replay;
    a call of another mode runs the runnable as it is."""
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import get_forward_context, is_forward_context_available

    wrapper = args[0]
    if not is_forward_context_available():
        return None
    context = get_forward_context()
    mode = context.cudagraph_runtime_mode
    if mode == CUDAGraphMode.NONE or mode != wrapper.runtime_mode:
        return None
    entry = wrapper.concrete_cudagraph_entries.get(context.batch_descriptor)
    if entry is None or entry.cudagraph is None:
        return _startup("capture")
    return _replay()


wrap_graph_wrapper_call = _held(_wrapper_call)


def wrap_add_eager(original):
    @functools.wraps(original)
    def add_eager(self, fn):
        """BreakableCUDAGraphCapture.add_eager: a DSA layer's eager region is recorded so that each replay
        opens the layer's forward (its points then record eagerly, with the replay's step)."""
        held = EAGER_LAYER.get()
        if held is not None:
            fn = guarded(_replaying, held, fn) or fn
        return original(self, fn)

    return add_eager


def _replaying(held, fn):
    from vllm.utils.torch_utils import weak_ref_tensor

    module, args, kwargs, _ = held
    held[3] = True
    output = kwargs.get("output", args[-1] if args else None)
    output = weak_ref_tensor(output) if output is not None else None  # the region's static output buffer

    def replay_eager_region():
        after = (lambda fwd, result: _tap_attn_out(fwd, (output,), {})) if output is not None else None
        return layers.layer_call("dsa_attn", module, layers.dsa_metadata, (), {}, fn, after)

    return replay_eager_region


# -- what the engine used: the cache writer's sharding, the local lengths --------------------------------
def wrap_block_tables_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        """Model Runner V2's BlockTables: its slot mapping shards the cache by cp_size/cp_rank/cp_interleave."""
        original(self, *args, **kwargs)
        guarded(_observe_cache_writer, self, "cp_size", "cp_rank", "cp_interleave")

    return __init__


def wrap_block_table_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        """V1's BlockTable: its slot mapping shards the cache by dcp_world_size/dcp_rank/interleave."""
        original(self, *args, **kwargs)
        guarded(_observe_cache_writer, self, "dcp_world_size", "dcp_rank", "cp_kv_cache_interleave_size")

    return __init__


def _observe_cache_writer(table, size: str, rank: str, interleave: str) -> None:
    """The sharding a block table's slot mapping uses, read from its attributes (guarded: a vLLM whose
    block table lacks them starts up all the same, and the tap falls back to the process group)."""
    WRITER.update(kv_dcp_size=int(getattr(table, size)), kv_dcp_rank=int(getattr(table, rank)),
                  interleave=int(getattr(table, interleave)), kv_dcp_source="block_table")


def wrap_metadata_build(original):
    @functools.wraps(original)
    def build(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
        """SparseMLACommonMetadataBuilder.build: the model runner's dcp_local_seq_lens ride on the metadata."""
        metadata = original(self, common_prefix_len, common_attn_metadata, *args, **kwargs)
        local = getattr(common_attn_metadata, "dcp_local_seq_lens", None)
        if local is not None:
            try:
                metadata._tensortap_local_seq_lens = local
            except Exception:  # a frozen or slotted metadata class: no local lengths recorded
                pass
        return metadata

    return build
