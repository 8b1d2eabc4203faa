"""The tap points on vLLM's MLA decode path: wrappers of vLLM's own functions, each recording what the
function consumed or produced (DESIGN section 3's points, in the order vLLM meets them)."""

from __future__ import annotations

import functools
import inspect
import threading

import tensortap
from tensortap.integrations.vllm import layers
from tensortap.integrations.vllm.patching import patch
from tensortap.integrations.vllm.state import ACTIVE, EAGER_LAYER, guarded
from tensortap.integrations.vllm.layers import _Forward, point

_PENDING = threading.local()  # .value: (o_proj_partial, its forward) until the all-reduce that takes it


# -- layer scopes ----------------------------------------------------------------------------------------
def wrap_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        """MLAAttention construction; then notes the layer and wraps its impl class's forward_mqa."""
        original(self, *args, **kwargs)
        guarded(_note, self)

    return __init__


def _note(module) -> None:
    layers.note_layer(module)
    forward_mqa = getattr(type(module.impl), "forward_mqa", None)
    if forward_mqa is not None and not hasattr(forward_mqa, "__tensortap_original__"):
        patch(type(module.impl), "forward_mqa", wrap_forward_mqa)


def _scoped(kind: str, metadata, after=None):
    """Layer wrapper factory: the call runs inside its tapped forward (`metadata` finds the batch's)."""

    def make(original):
        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            if ACTIVE.get() is not None:
                return original(self, *args, **kwargs)
            try:
                entered = layers.enter(self)
            except Exception:  # the tap never raises into the forward; layer_call asks again and logs it
                entered = ()
            if entered is None:  # an untapped layer: this is all it costs
                return original(self, *args, **kwargs)
            return layers.layer_call(kind, self, metadata, args, kwargs, lambda: original(self, *args, **kwargs),
                                     after, entered)
        return wrapper
    return make


def _tap_o_proj(fwd: _Forward, partial) -> None:
    """o_proj_partial [T, hidden]: this rank's o_proj product, before the TP all-reduce."""
    point(fwd, "o_proj_partial", partial[: fwd.num_actual])
    _PENDING.value = (partial, fwd) if "hidden" in fwd.wanted else None


wrap_dsa_forward = _scoped("dsa", layers.dsa_metadata, _tap_o_proj)  # DeepSeek-V3.2/GLM DSA attention
wrap_forward_impl = _scoped("mla", layers.impl_metadata)  # generic MLA attention, inside vLLM's custom op


def wrap_dsa_attn(original):
    @functools.wraps(original)
    def _sparse_indexer_and_attn(self, *args, **kwargs):
        """DeepseekV32Attention's eager region (indexer, MQA attention, merge, W_UV): attn_out after it.
        Outside a tapped forward it only runs; a breakable graph's replay of it opens the layer's forward
        itself (engine.add_eager)."""
        held = [self, args, kwargs, False]  # [3]: a breakable capture recorded it for replay (engine.add_eager)
        token = EAGER_LAYER.set(held)
        try:
            result = original(self, *args, **kwargs)
            fwd = ACTIVE.get()
            if fwd is not None and not held[3]:  # else each replay of the region records attn_out itself
                guarded(_tap_attn_out, fwd, args, kwargs)
            return result
        finally:
            EAGER_LAYER.reset(token)

    return _sparse_indexer_and_attn


def _tap_attn_out(fwd: _Forward, args, kwargs) -> None:
    """attn_out [T, Hl*v]: W_UV's output and the row-parallel o_proj's input (`output` of the DSA call,
    `out` of the generic _v_up_proj; both the last argument)."""
    if fwd.mqa_rows > 0:
        output = kwargs.get("output", kwargs.get("out", args[-1] if args else None))
        point(fwd, "attn_out", output[: fwd.mqa_rows], head_offset=fwd.tp_rank * fwd.heads)


def wrap_v_up(original):
    @functools.wraps(original)
    def _v_up_proj(*args, **kwargs):
        """MLAAttention._v_up_proj (generic MLA models): attn_out."""
        result = original(*args, **kwargs)
        fwd = ACTIVE.get()
        if fwd is not None and fwd.kind == "mla":
            guarded(_tap_attn_out, fwd, args, kwargs)
        return result

    return _v_up_proj


# -- per-rank attention and the merge -------------------------------------------------------------------
def wrap_forward_mqa(original):
    signature = inspect.signature(original)  # (self, q, kv_cache, attn_metadata, layer): names vary by impl

    @functools.wraps(original)
    def forward_mqa(self, *args, **kwargs):
        """Per-rank MQA attention: block_table and q before; partial_out, lse after."""
        fwd = ACTIVE.get()
        if fwd is None or fwd.in_mqa:
            return original(self, *args, **kwargs)
        fwd.in_mqa, fwd.slots_done = True, False
        try:
            guarded(_tap_mqa_inputs, fwd, signature, (self, *args), kwargs)
            result = original(self, *args, **kwargs)
            guarded(_tap_mqa_outputs, fwd, self, result)
            return result
        finally:
            fwd.in_mqa = False

    return forward_mqa


def _tap_mqa_inputs(fwd: _Forward, signature, args: tuple, kwargs: dict) -> None:
    """block_table [R, nb] of this batch's requests, then q as attention consumes it [T, Hq, 576] (after the
    DCP all-gather, or as replicated under dcp_q_replicate); its head_offset is the group's first head."""
    import torch

    q, kv_cache, md = list(signature.bind(*args, **kwargs).arguments.values())[1:4]
    first = q[0] if isinstance(q, tuple) else q  # [T, Hq, 512] of a (ql_nope, q_pe) pair, or [T, Hq, 576]
    fwd.mqa_rows, fwd.kv_cache, fwd.md = first.shape[0], kv_cache, md
    gathered = max(first.shape[1] // fwd.heads, 1)  # TP ranks whose heads q holds: the DCP group, or 1
    fwd.q_offset = (fwd.tp_rank // gathered) * gathered * fwd.heads
    table = _block_table(md)
    if table is not None:
        point(fwd, "block_table", table)
    if "q" in fwd.wanted:
        point(fwd, "q", torch.cat(q, dim=-1) if isinstance(q, tuple) else q, head_offset=fwd.q_offset)


def _block_table(md):
    table = getattr(md, "block_table", None)
    if table is None:
        table = getattr(getattr(md, "decode", None), "block_table", None)
    return None if table is None else table[: md.num_reqs]  # [R, nb]


def _tap_mqa_outputs(fwd: _Forward, impl, result) -> None:
    """partial_out [T, Hq, 512] and lse [T, Hq] (in the backend's base, lse_base) before any merge; an impl
    that believes DCP 1 merges nothing, so its output is also merged_out (the rank's own heads)."""
    out, lse = result
    point(fwd, "partial_out", out, head_offset=fwd.q_offset)
    if lse is not None:
        point(fwd, "lse", lse, head_offset=fwd.q_offset)
    if impl.dcp_world_size <= 1:
        point(fwd, "merged_out", out, head_offset=fwd.q_offset)


def _tap_merged(fwd: _Forward, merged, args, kwargs) -> None:
    """merged_out [T, Hl, 512]: a reduce-scatter leaves the rank its own heads; an all-reduce (PCP) keeps all."""
    own = merged.shape[1] < args[0].shape[1]
    point(fwd, "merged_out", merged, head_offset=fwd.tp_rank * fwd.heads if own else fwd.q_offset)


def _after(tap, when=lambda fwd, args, kwargs: True):
    """Wrapper factory: run the original, then, inside a tapped forward and if `when(fwd, args, kwargs)`,
    `tap(fwd, result, args, kwargs)`, guarded."""

    def make(original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            fwd = ACTIVE.get()
            if fwd is not None and when(fwd, args, kwargs):
                guarded(tap, fwd, result, args, kwargs)
            return result
        return wrapper
    return make


def wrap_init_combine(original):
    @functools.wraps(original)
    def _init_combine(self, *args, **kwargs):
        """MLADCPManager: the combine bound here (ag_rs, a2a or direct workspace), wrapped by _tap_merged."""
        return _after(_tap_merged)(original(self, *args, **kwargs))

    return _init_combine


# -- index conversion, the pages it reads, and the all-reduce ---------------------------------------------
def _converting(fwd: _Forward, args, kwargs) -> bool:
    return fwd.in_mqa and not fwd.slots_done and not kwargs.get("HAS_PREFILL_WORKSPACE")


def wrap_convert(original):
    signature = inspect.signature(original)

    def _tap_converted(fwd: _Forward, result, args, kwargs) -> None:
        """topk and slots of a module-level conversion, with the DCP view of the filter that made them."""
        given = signature.bind(*args, **kwargs)
        given.apply_defaults()
        a = given.arguments
        _tap_slots(fwd, a["token_indices"], result, a.get("dcp_size", 1), a.get("dcp_rank", 0),
                   a.get("cp_kv_cache_interleave_size", 1), a.get("BLOCK_STRIDE_ROWS"), a.get("compact_valid_to_front"))

    return _after(_tap_converted, when=_converting)(original)


def _tap_group_converted(fwd: _Forward, result, args, kwargs) -> None:
    """topk and slots of the index group's DCP 1 decode conversion (made once per group, read per layer)."""
    topk = kwargs.get("logical_topk_indices", args[2] if len(args) > 2 else None)
    _tap_slots(fwd, topk, result, 1, 0, 1, kwargs.get("block_stride_rows"), False)


wrap_group_convert = _after(_tap_group_converted, when=_converting)


def _tap_slots(fwd: _Forward, topk, result, dcp_size, dcp_rank, interleave, block_stride_rows, compacted) -> None:
    """topk [T, K] global token ids (-1 padding); slots [T, K] physical slots (-1: not on this rank), with the
    DCP size/rank the filter used; `compacted`: valid slots moved to the row's front (compare as sets).
    Then kv_pages (pages.py) from both."""
    from tensortap.integrations.vllm.pages import tap_kv_pages

    fwd.slots_done = True
    point(fwd, "topk", topk)
    meta = dict(filter_dcp_size=dcp_size, filter_dcp_rank=dcp_rank, filter_interleave=interleave,
                block_stride_rows=block_stride_rows, compacted=bool(compacted))
    slots = result[0] if isinstance(result, tuple) else result  # [T, K]
    point(fwd, "slots", slots, **{k: v for k, v in meta.items() if v is not None})
    if "kv_pages" in fwd.wanted:
        tap_kv_pages(fwd, topk, slots, block_stride_rows)


def wrap_all_reduce(original):
    @functools.wraps(original)
    def tensor_model_parallel_all_reduce(input_, *args, **kwargs):
        """The unfused TP all-reduce before the post-attention RMSNorm: hidden (hidden_kind=sum) when it
        reduces the o_proj_partial of the layer just tapped."""
        reduced = original(input_, *args, **kwargs)
        fwd = _take_pending(input_)
        if fwd is not None:
            guarded(_tap_hidden, fwd, reduced, "sum")
        return reduced

    return tensor_model_parallel_all_reduce


def wrap_fused_all_reduce(original):
    @functools.wraps(original)
    def flashinfer_trtllm_fused_allreduce_norm(*args, **kwargs):
        """flashinfer's all-reduce + residual add + RMSNorm (the H100/H200 decode path): hidden
        (hidden_kind=post_norm) is its norm_out when it reduces the o_proj_partial just tapped. The
        reduced sum itself is never a tensor here; the normed output is identical across the TP group
        exactly as the sum is."""
        fwd = _take_pending(kwargs.get("allreduce_in", args[0] if args else None))
        result = original(*args, **kwargs)
        if fwd is not None and kwargs.get("norm_out") is not None:
            guarded(_tap_hidden, fwd, kwargs["norm_out"], "post_norm")
        return result

    return flashinfer_trtllm_fused_allreduce_norm


def _take_pending(input_):
    pending = getattr(_PENDING, "value", None)
    if pending is not None and pending[0] is input_:
        _PENDING.value = None
        return pending[1]
    return None


def _tap_hidden(fwd: _Forward, reduced, kind: str) -> None:
    """hidden [T, hidden]: after the TP all-reduce, identical on every TP rank."""
    with tensortap.scope(**fwd.meta):
        point(fwd, "hidden", reduced[: fwd.num_actual], hidden_kind=kind)
