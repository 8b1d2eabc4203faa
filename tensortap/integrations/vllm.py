"""vLLM 0.33.0 plugin: tap points on the MLA decode path (DESIGN section 3), switched on by TAP.

`register()` is the `vllm.general_plugins` entry point, run in every vLLM process before the model
is built. TAP unset, empty or "0": it returns at once, patching nothing. Otherwise it validates TAP
(`tensortap.configure`) and wraps, at class or module level (attribute -> points):

  MLAAttention.__init__                 layer index, role, DCP config; wraps its impl's class
  <impl class>.forward_mqa              q (after the DCP all-gather), block_table, kv_pages,
                                        partial_out, lse; merged_out if the impl believes DCP 1
  triton_filter_and_convert_dcp_index   topk (input), slots (output) of DCP > 1; rebound in
                                        sparse_utils, sparse_mla_attention, flashmla_sparse
  triton_convert_req_index_to_global_index  the same for DCP 1 (sparse_mla_attention, flashmla_sparse)
  SparseMLAIndexGroup.convert_logical_to_physical_topk   topk, slots of DCP 1 decode
  MLADCPManager._init_combine           merged_out (wraps the combine it binds at build time)
  DeepseekV32Attention.forward          the layer's scope; o_proj_partial (reduce_results=False)
  DeepseekV32Attention._sparse_indexer_and_attn   attn_out (its inline W_UV bmm's output)
  MLAAttention.forward_impl, _v_up_proj the scope and attn_out of other MLA models
  fused_allreduce_rms_norm's tensor_model_parallel_all_reduce   hidden

Layer: `layers.<L>` in the layer's name. Role: "draft" when built under a speculative model tag
(eagle_head, draft_model, dspark_head, dflash_head) or when L >= the model's num_hidden_layers
(vLLM's MTP test), else "target". Step: target forwards of this process (one starts when the
target layer index stops increasing; warm-ups with attention metadata count, on every rank);
spec_pos: draft passes since then (each MTP layer call is one).

Not captured: hidden on the fused path (flashinfer all-reduce + RMSNorm on NVSwitch systems: the
reduced sum is never a tensor), under sequence-parallel MoE or at TP 1; o_proj_partial and hidden
outside DeepseekV32Attention (RowParallelLinear reduces inside); lse when the impl believes DCP 1
(vLLM drops it); steps replayed from CUDA graphs (points met in capture are skipped and counted:
serve with --enforce-eager); topk/slots of HiSparse caches and prefill-workspace conversions (one
conversion per forward_mqa is kept: the decode rows of a mixed batch).
"""

from __future__ import annotations

import collections
import contextvars
import functools
import importlib
import inspect
import logging
import os
import re
import threading
from dataclasses import dataclass

import tensortap

log = logging.getLogger("tensortap")

POINTS = ("block_table", "q", "topk", "slots", "kv_pages", "partial_out", "lse", "merged_out", "attn_out",
          "o_proj_partial", "hidden")
DRAFT_TAGS = ("eagle_head", "draft_model", "dspark_head", "dflash_head")
_MLA = "vllm.model_executor.layers.attention.mla_attention"
_SPARSE = "vllm.model_executor.layers.attention.sparse_mla_attention"
_FLASHMLA = "vllm.v1.attention.backends.mla.flashmla_sparse"
_DSA = "vllm.models.deepseek_v32.attention"
_FILTER, _CONVERT = "triton_filter_and_convert_dcp_index", "triton_convert_req_index_to_global_index"
_ABSENT = object()
_PATCHES: list[tuple[object, str, object]] = []  # (owner, attribute, what its __dict__ held), in patch order
_REGISTERED = threading.Event()
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("tensortap_vllm_forward", default=None)
_PENDING = threading.local()  # .value: (o_proj_partial, its forward) until the all-reduce that takes it
_WARNED: set[str] = set()


# -- register / unregister -------------------------------------------------------------------------------
def register() -> None:
    """vLLM general-plugin hook: with TAP set, validate it and patch the MLA decode path (once per process)."""
    value = os.environ.get("TAP")
    if value is None or value.strip() in ("", "0") or _REGISTERED.is_set():
        return
    tensortap.configure(value)  # a malformed TAP raises TapConfigError: start-up fails with its one line
    _REGISTERED.set()
    for module_name, path, make_wrapper in _targets():
        try:
            owner = importlib.import_module(module_name)
            *parents, attribute = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            _patch(owner, attribute, make_wrapper)
        except Exception as exc:  # what this vLLM build or platform lacks is not captured
            log.warning("tensortap: %s.%s not patched (%s: %s)", module_name, path, type(exc).__name__, exc)


def unregister() -> None:
    """Restore every patched attribute and reset the step counters (tests, or to leave vLLM untouched)."""
    while _PATCHES:
        owner, attribute, saved = _PATCHES.pop()
        if saved is _ABSENT:
            delattr(owner, attribute)
        else:
            setattr(owner, attribute, saved)
    _STEPS.__init__()
    _REGISTERED.clear()


def _targets() -> tuple:
    return (
        (_MLA, "MLAAttention.__init__", _wrap_init),
        (_MLA, "MLAAttention.forward_impl", _wrap_forward_impl),
        (_MLA, "MLAAttention._v_up_proj", _wrap_v_up),
        (_DSA, "DeepseekV32Attention.forward", _wrap_dsa_forward),
        (_DSA, "DeepseekV32Attention._sparse_indexer_and_attn", _wrap_dsa_attn),
        ("vllm.v1.attention.ops.dcp", "MLADCPManager._init_combine", _wrap_init_combine),
        ("vllm.v1.attention.backends.mla.sparse_utils", _FILTER, _wrap_convert),
        (_SPARSE, _FILTER, _wrap_convert),
        (_FLASHMLA, _FILTER, _wrap_convert),
        (_SPARSE, _CONVERT, _wrap_convert),
        (_FLASHMLA, _CONVERT, _wrap_convert),
        ("vllm.v1.attention.backends.mla.index_group", "SparseMLAIndexGroup.convert_logical_to_physical_topk",
         _wrap_group_convert),
        ("vllm.models.common.ops.fused_allreduce_rms_norm", "tensor_model_parallel_all_reduce", _wrap_all_reduce),
    )


def _patch(owner, attribute: str, make_wrapper) -> None:
    original = getattr(owner, attribute)
    wrapper = make_wrapper(original)
    wrapper.__tensortap_original__ = original
    _PATCHES.append((owner, attribute, vars(owner).get(attribute, _ABSENT)))
    setattr(owner, attribute, wrapper)


def _guarded(fn, *args):
    """Run tap-side code: an exception is logged once per function and swallowed; the model keeps running."""
    try:
        return fn(*args)
    except Exception as exc:
        if fn.__name__ not in _WARNED:
            _WARNED.add(fn.__name__)
            log.error("tensortap: vLLM tap %s failed (%s: %s); the model keeps running", fn.__name__,
                      type(exc).__name__, exc)
        return None


# -- layers, roles, steps: the forward being tapped ------------------------------------------------------
_Layer = collections.namedtuple("_Layer", "layer role mtp interleave backend")  # what construction tells


@dataclass
class _Forward:
    """One tapped layer call: its scope metadata and what the inner hooks learn along the way."""

    prefix: str  # "layers.<L>.attn."
    wanted: frozenset
    meta: dict
    heads: int  # heads this TP rank owns (H / TP)
    tp_rank: int
    kind: str  # "dsa" (DeepseekV32Attention) or "mla" (generic forward_impl)
    num_actual: int
    q_offset: int = 0
    mqa_rows: int = 0
    in_mqa: bool = False
    slots_done: bool = False


class _Steps:
    """Per-process counters: a target forward starts when the target layer index stops increasing; a
    draft pass at every MTP layer call, or when a draft model's layer index stops increasing."""

    def __init__(self):
        self.step, self.spec_pos, self.last_target, self.last_draft = -1, -1, None, None

    def enter(self, info: _Layer) -> tuple[int, int]:
        if info.role == "target":
            if self.last_target is None or info.layer <= self.last_target:
                self.step, self.spec_pos, self.last_draft = self.step + 1, -1, None
            self.last_target = info.layer
            return self.step, 0
        if info.mtp or self.last_draft is None or info.layer <= self.last_draft:
            self.spec_pos += 1
        self.last_draft = info.layer
        return max(self.step, 0), self.spec_pos


_STEPS = _Steps()


def _note_layer(module) -> None:
    """At construction: layer index, role and the DCP config the layer is built with; wrap its impl's class."""
    from vllm.compilation import backends
    from vllm.config import get_current_vllm_config_or_none

    found = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", module.layer_name)  # "model.layers.78.self_attn.attn"
    layer = int(found.group(1))
    config = get_current_vllm_config_or_none()
    text_config = getattr(getattr(config, "model_config", None), "hf_text_config", None)
    mtp = layer >= getattr(text_config, "num_hidden_layers", float("inf"))
    role = "draft" if mtp or backends.model_tag in DRAFT_TAGS else "target"
    parallel = getattr(config, "parallel_config", None)
    module._tensortap = _Layer(layer, role, mtp, getattr(parallel, "cp_kv_cache_interleave_size", 1),
                               getattr(parallel, "dcp_comm_backend", None))
    forward_mqa = getattr(type(module.impl), "forward_mqa", None)
    if forward_mqa is not None and not hasattr(forward_mqa, "__tensortap_original__"):
        _patch(type(module.impl), "forward_mqa", _wrap_forward_mqa)


def _layer_meta(module, info: _Layer) -> dict:
    """What the layer believes (its impl's DCP) next to what the process groups say; cached per layer."""
    from vllm.distributed import parallel_state as ps

    if getattr(module, "_tensortap_meta", None) is None:
        try:
            tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        except AssertionError:  # no TP group: one process without distributed init
            tp_rank, tp_size = 0, 1
        group_size, group_rank = ps.get_dcp_world_size_and_rank(True)
        meta = dict(
            tp_rank=tp_rank, tp_size=tp_size, dcp_rank=module.impl.dcp_rank, dcp_size=module.impl.dcp_world_size,
            group_dcp_rank=group_rank, group_dcp_size=group_size, kv_dcp_size=group_size, interleave=info.interleave,
            num_heads=module.num_heads * tp_size, kv_format=str(module.kv_cache_dtype),
            softmax_scale=float(module.scale), kv_lora_rank=module.kv_lora_rank, rope_dim=module.qk_rope_head_dim,
            dcp_comm_backend=info.backend,
        )
        module._tensortap_meta = {k: v for k, v in meta.items() if v is not None}
    return module._tensortap_meta


def _batch_meta(md, meta: dict) -> dict:
    """block_size, interleave and sequence lengths of this batch. The lengths stay device tensors [R], staged
    with each record (no host sync); local_seq_lens is the cache writer's share on this DCP rank."""
    from vllm.v1.attention.backends.utils import get_dcp_local_seq_lens

    out = {}
    for key, attribute in (("block_size", "block_size"), ("interleave", "cp_kv_cache_interleave_size")):
        if isinstance(getattr(md, attribute, None), int):
            out[key] = getattr(md, attribute)
    seq_lens, num_reqs = getattr(md, "seq_lens", None), getattr(md, "num_reqs", None)
    if seq_lens is not None and isinstance(num_reqs, int):
        out["seq_lens"] = seq_lens[:num_reqs]  # [R]
        out["local_seq_lens"] = get_dcp_local_seq_lens(  # [R]
            out["seq_lens"], meta["kv_dcp_size"], meta["group_dcp_rank"], out.get("interleave", meta["interleave"]))
    return out


def _open(module, md, kind: str) -> _Forward | None:
    """The tapped forward of one layer call; None when it is not a noted layer or nothing of it is wanted."""
    info = getattr(module, "_tensortap", None)
    if info is None or md is None:
        return None
    step, spec_pos = _STEPS.enter(info)
    meta = dict(step=step, layer=info.layer, role=info.role, spec_pos=spec_pos)
    prefix = f"layers.{info.layer}.attn."
    wanted = frozenset(p for p in POINTS if tensortap.wants(prefix + p, **meta))
    if not wanted:
        return None
    meta.update(_layer_meta(module, info))
    meta.update(_batch_meta(md, meta))
    return _Forward(prefix, wanted, meta, module.num_heads, meta["tp_rank"], kind, md.num_actual_tokens)


def _layer_call(kind: str, module, md, call):
    """Run one layer call inside its tapped forward; calls nested in an open forward pass straight through."""
    if _ACTIVE.get() is not None:
        return call()
    fwd = _guarded(_open, module, md, kind)
    if fwd is None:
        return call()
    token = _ACTIVE.set(fwd)
    try:
        with tensortap.scope(**fwd.meta):
            result = call()
            if kind == "dsa":
                _guarded(_tap_o_proj, fwd, result)
            return result
    finally:
        _ACTIVE.reset(token)


def _point(fwd: _Forward, point: str, tensor, **meta) -> None:
    if point in fwd.wanted:
        tensortap.point(fwd.prefix + point, tensor, **meta)


# -- layer scopes ----------------------------------------------------------------------------------------
def _wrap_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        """MLAAttention construction; then notes the layer and wraps its impl class's forward_mqa."""
        original(self, *args, **kwargs)
        _guarded(_note_layer, self)

    return __init__


def _dsa_metadata(module, args, kwargs):
    """This layer's attention metadata from the forward context (None in profiling runs)."""
    from vllm import forward_context
    from vllm.model_executor.layers.attention import attention

    if not forward_context.is_forward_context_available():
        return None
    return attention.get_attention_context(module.layer_name)[0]


def _impl_metadata(module, args, kwargs):
    """forward_impl(q, k_c_normed, k_pe, kv_cache, attn_metadata, output, ...): its attention metadata."""
    return kwargs["attn_metadata"] if "attn_metadata" in kwargs else args[4]


def _scoped(kind: str, metadata):
    """Layer wrapper factory: the call runs inside its tapped forward (`metadata` finds the batch's)."""

    def make(original):
        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            md = _guarded(metadata, self, args, kwargs)
            return _layer_call(kind, self, md, lambda: original(self, *args, **kwargs))
        return wrapper
    return make


_wrap_dsa_forward = _scoped("dsa", _dsa_metadata)  # DeepSeek-V3.2/GLM DSA attention; o_proj_partial on return
_wrap_forward_impl = _scoped("mla", _impl_metadata)  # generic MLA attention, inside vLLM's attention custom op


def _tap_o_proj(fwd: _Forward, partial) -> None:
    """o_proj_partial [T, hidden]: this rank's o_proj product, before the TP all-reduce."""
    _point(fwd, "o_proj_partial", partial[: fwd.num_actual])
    _PENDING.value = (partial, fwd) if "hidden" in fwd.wanted else None


def _after(tap, when=lambda fwd, args, kwargs: True):
    """Wrapper factory: run the original, then, inside a tapped forward and if `when(fwd, args, kwargs)`,
    `tap(fwd, result, args, kwargs)`, guarded. Each tap's docstring says what it captures."""

    def make(original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            fwd = _ACTIVE.get()
            if fwd is not None and when(fwd, args, kwargs):
                _guarded(tap, fwd, result, args, kwargs)
            return result
        return wrapper
    return make


# -- per-rank attention and the merge -------------------------------------------------------------------
def _wrap_forward_mqa(original):
    signature = inspect.signature(original)  # (self, q, kv_cache, attn_metadata, layer): names vary by impl

    @functools.wraps(original)
    def forward_mqa(self, *args, **kwargs):
        """Per-rank MQA attention: q, block_table, kv_pages before; partial_out, lse after."""
        fwd = _ACTIVE.get()
        if fwd is None or fwd.in_mqa:
            return original(self, *args, **kwargs)
        fwd.in_mqa, fwd.slots_done = True, False
        try:
            _guarded(_tap_mqa_inputs, fwd, signature, (self, *args), kwargs)
            result = original(self, *args, **kwargs)
            _guarded(_tap_mqa_outputs, fwd, self, result)
            return result
        finally:
            fwd.in_mqa = False

    return forward_mqa


def _tap_mqa_inputs(fwd: _Forward, signature, args: tuple, kwargs: dict) -> None:
    """block_table, kv_pages (_tap_cache), then q as attention consumes it [T, Hq, 576]; its head_offset is
    the first head of the ranks gathered into it."""
    import torch

    q, kv_cache, md = list(signature.bind(*args, **kwargs).arguments.values())[1:4]
    first = q[0] if isinstance(q, tuple) else q  # [T, Hq, 512] of a (ql_nope, q_pe) pair, or [T, Hq, 576]
    fwd.mqa_rows = first.shape[0]
    gathered = max(first.shape[1] // fwd.heads, 1)  # TP ranks whose heads q holds: the DCP group, or 1
    fwd.q_offset = (fwd.tp_rank // gathered) * gathered * fwd.heads
    _tap_cache(fwd, kv_cache, md)
    if "q" in fwd.wanted:
        _point(fwd, "q", torch.cat(q, dim=-1) if isinstance(q, tuple) else q, head_offset=fwd.q_offset)


def _tap_cache(fwd: _Forward, kv_cache, md) -> None:
    """block_table [R, nb] of this batch's requests; kv_pages [P, bs, 656]: every page those rows address up
    to max_seq_len (a gather, no host sync; a superset of the pages the slots touch), with page_ids [P]."""
    table = getattr(md, "block_table", None)
    if table is None:
        table = getattr(getattr(md, "decode", None), "block_table", None)
    if table is None:
        return
    table = table[: md.num_reqs]  # [R, nb]
    _point(fwd, "block_table", table)
    if "kv_pages" in fwd.wanted and kv_cache.dim() == 3:
        max_seq_len = getattr(md, "max_seq_len", None)
        width = table.shape[1] if max_seq_len is None else min(table.shape[1], -(-max_seq_len // kv_cache.shape[1]))
        page_ids = table[:, :width].reshape(-1).clamp(0, kv_cache.shape[0] - 1)  # [P]
        _point(fwd, "kv_pages", kv_cache[page_ids.long()], page_ids=page_ids)  # [P, bs, 656]


def _tap_mqa_outputs(fwd: _Forward, impl, result) -> None:
    """partial_out [T, Hq, 512] and lse [T, Hq] (natural log) before any merge; an impl that believes DCP 1
    merges nothing, so its output is also merged_out (the rank's own heads)."""
    out, lse = result
    _point(fwd, "partial_out", out, head_offset=fwd.q_offset)
    if lse is not None:
        _point(fwd, "lse", lse, head_offset=fwd.q_offset)
    if impl.dcp_world_size <= 1:
        _point(fwd, "merged_out", out, head_offset=fwd.q_offset)


def _tap_merged(fwd: _Forward, merged, args, kwargs) -> None:
    """merged_out [T, Hl, 512]: a reduce-scatter leaves the rank its own heads; an all-reduce (PCP) keeps all."""
    own = merged.shape[1] < args[0].shape[1]
    _point(fwd, "merged_out", merged, head_offset=fwd.tp_rank * fwd.heads if own else fwd.q_offset)


def _wrap_init_combine(original):
    @functools.wraps(original)
    def _init_combine(self, *args, **kwargs):
        """MLADCPManager: the combine bound here (ag_rs, a2a or direct workspace), wrapped by _tap_merged."""
        return _after(_tap_merged)(original(self, *args, **kwargs))

    return _init_combine


def _tap_attn_out(fwd: _Forward, result, args, kwargs) -> None:
    """attn_out [T, Hl*v]: W_UV's output and the row-parallel o_proj's input (`output` of the DSA call,
    `out` of the generic _v_up_proj; both the last argument)."""
    output = kwargs.get("output", kwargs.get("out", args[-1]))
    _point(fwd, "attn_out", output[: fwd.mqa_rows], head_offset=fwd.tp_rank * fwd.heads)


_wrap_dsa_attn = _after(_tap_attn_out, when=lambda fwd, args, kwargs: fwd.mqa_rows > 0)
_wrap_v_up = _after(_tap_attn_out, when=lambda fwd, args, kwargs: fwd.kind == "mla")


# -- index conversion and the all-reduce -----------------------------------------------------------------
def _converting(fwd: _Forward, args, kwargs) -> bool:
    return fwd.in_mqa and not fwd.slots_done and not kwargs.get("HAS_PREFILL_WORKSPACE")


def _wrap_convert(original):
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


_wrap_group_convert = _after(_tap_group_converted, when=_converting)


def _tap_slots(fwd: _Forward, topk, result, dcp_size, dcp_rank, interleave, block_stride_rows, compacted) -> None:
    """topk [T, K] global token ids (-1 padding); slots [T, K] physical slots (-1: not on this rank), with the
    DCP size/rank the filter used; `compacted`: valid slots moved to the row's front (compare as sets)."""
    fwd.slots_done = True
    _point(fwd, "topk", topk)
    meta = dict(filter_dcp_size=dcp_size, filter_dcp_rank=dcp_rank, filter_interleave=interleave,
                block_stride_rows=block_stride_rows, compacted=bool(compacted))
    slots = result[0] if isinstance(result, tuple) else result  # [T, K]
    _point(fwd, "slots", slots, **{k: v for k, v in meta.items() if v is not None})


def _wrap_all_reduce(original):
    @functools.wraps(original)
    def tensor_model_parallel_all_reduce(input_, *args, **kwargs):
        """The unfused TP all-reduce before the post-attention RMSNorm; _tap_hidden when it reduces the
        o_proj_partial of the layer just tapped."""
        reduced = original(input_, *args, **kwargs)
        pending = getattr(_PENDING, "value", None)
        if pending is not None and pending[0] is input_:
            _PENDING.value = None
            _guarded(_tap_hidden, pending[1], reduced)
        return reduced

    return tensor_model_parallel_all_reduce


def _tap_hidden(fwd: _Forward, reduced) -> None:
    """hidden [T, hidden]: the all-reduced o_proj output, identical on every TP rank."""
    with tensortap.scope(**fwd.meta):
        _point(fwd, "hidden", reduced[: fwd.num_actual])
