"""Layers and their calls: what a layer's construction tells (index, role, DCP belief), and the tapped
forward of one layer call (its scope metadata, what is wanted of it).

One question per layer call: the points of a layer that the filter's per-name part keeps (and its role)
are computed once per layer and config; a layer with none costs one dict lookup. Only a kept layer asks
`tensortap.wants` (step, rank, budget) once, then reads its metadata.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import tensortap
from tensortap.integrations.vllm import state
from tensortap.integrations.vllm.state import ACTIVE, ENGINE, WRITER, guarded
from tensortap.vocab import POINTS

DRAFT_TAGS = ("eagle_head", "draft_model", "dspark_head", "dflash_head")


class _Layer:
    """What construction tells of a layer, and (per config) the points its name and role pass."""

    __slots__ = ("layer", "role", "mtp", "config", "points")

    def __init__(self, layer: int, role: str, mtp: bool):
        self.layer, self.role, self.mtp, self.config, self.points = layer, role, mtp, None, frozenset()


@dataclass
class _Forward:
    """One tapped layer call: its scope metadata and what the inner hooks learn along the way."""

    prefix: str  # "layers.<L>.attn."
    wanted: frozenset
    meta: dict
    heads: int  # heads this TP rank owns (H / TP)
    tp_rank: int
    kind: str  # "dsa" (DeepseekV32Attention.forward), "dsa_attn" (its eager region alone), "mla" (forward_impl)
    num_actual: int
    md: object = None
    graph_only: bool = False  # opened while a graph is captured: only points that feed a graph slot
    q_offset: int = 0
    mqa_rows: int = 0
    kv_cache: object = None
    in_mqa: bool = False
    slots_done: bool = False


class _Steps:
    """Per-process counters: a target forward starts when the target layer index stops increasing; a
    draft pass at every MTP layer call, or when a draft model's layer index stops increasing. The step is
    the engine's where a model runner is seen (engine.py); spec_pos always comes from here."""

    def __init__(self):
        self.step, self.spec_pos, self.last_target, self.last_draft = -1, -1, None, None
        self.engine_step = None  # the engine step the draft passes are counted in

    def enter(self, info: _Layer) -> tuple[int, int]:
        layer = info.layer
        if ENGINE.phase is not None and ENGINE.step != self.engine_step:
            # A new engine step restarts the draft count, also when the target ran inside a FULL
            # graph (no target layer Python ran to restart it).
            self.engine_step, self.spec_pos, self.last_draft = ENGINE.step, -1, None
        if info.role == "target":
            last = self.last_target
            if last is None or layer <= last:
                self.step, self.spec_pos, self.last_draft = self.step + 1, -1, None
            self.last_target = layer
            return self.step, 0
        last = self.last_draft
        if info.mtp or last is None or layer <= last:
            self.spec_pos += 1
        self.last_draft = layer
        return max(self.step, 0), self.spec_pos


STEPS = _Steps()


class _Wanted:
    """Per config: layer -> the points its name and role pass (the per-name part of the filter); per step:
    (role, spec_pos) -> the verdict of `tensortap.wants` on the rest (step, rank, budget), asked once."""

    def __init__(self):
        self.config, self.step, self.forwards = None, None, {}

    def forward(self, name: str, meta: dict) -> bool:
        if meta["step"] != self.step:
            self.step, self.forwards = meta["step"], {}
        key = (meta["role"], meta["spec_pos"])
        verdict = self.forwards.get(key)
        if verdict is None:
            verdict = self.forwards[key] = tensortap.wants(name, **meta)
        return verdict

    def get(self, info: _Layer) -> frozenset:
        config = tensortap.current_config()
        if config is not info.config:
            if config is not self.config:
                self.config, self.step, self.forwards = config, None, {}
            flt = config.filter if config is not None else None
            role_ok = flt is not None and (flt.roles is None or info.role in flt.roles)
            info.points = frozenset(p for p in POINTS if role_ok and flt.keeps_point(p, info.layer))
            info.config = config
        return info.points


WANTED = _Wanted()


def reset() -> None:
    STEPS.__init__()
    WANTED.__init__()


def note_layer(module) -> None:
    """At construction: layer index and role; the impl's DCP belief is read from the impl at the first call."""
    from vllm.compilation import backends
    from vllm.config import get_current_vllm_config_or_none

    found = re.search(r"(?:^|\.)layers\.(\d+)(?:\.|$)", module.layer_name)  # "model.layers.78.self_attn.attn"
    layer = int(found.group(1))
    config = get_current_vllm_config_or_none()
    text_config = getattr(getattr(config, "model_config", None), "hf_text_config", None)
    mtp = layer >= getattr(text_config, "num_hidden_layers", float("inf"))
    role = "draft" if mtp or backends.model_tag in DRAFT_TAGS else "target"
    module._tensortap = _Layer(layer, role, mtp)


def _layer_meta(module) -> dict:
    """What the layer believes (its impl's DCP, from AttentionImplBase.__new__) next to what the process
    groups say, its backend's LSE base and q replication; cached per layer."""
    from vllm.distributed import parallel_state as ps

    if getattr(module, "_tensortap_meta", None) is None:
        try:
            tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        except AssertionError:  # no TP group: one process without distributed init
            tp_rank, tp_size = 0, 1
        group_size, group_rank = ps.get_dcp_world_size_and_rank(True)
        impl = module.impl
        manager = getattr(module, "dcp_manager", None)
        meta = dict(
            tp_rank=tp_rank, tp_size=tp_size, dcp_rank=impl.dcp_rank, dcp_size=impl.dcp_world_size,
            group_dcp_rank=group_rank, group_dcp_size=group_size, num_heads=module.num_heads * tp_size,
            kv_format=str(module.kv_cache_dtype), softmax_scale=float(module.scale),
            kv_lora_rank=module.kv_lora_rank, rope_dim=module.qk_rope_head_dim,
            lse_base="e" if getattr(impl, "lse_base_on_e", True) else "2",
            dcp_q_replicate=bool(getattr(module, "dcp_q_replicate", False)),
            dcp_comm_backend=("a2a" if manager.use_a2a else "ag_rs") if manager is not None else None,
        )
        module._tensortap_meta = {k: v for k, v in meta.items() if v is not None}
    return module._tensortap_meta


def _batch_meta(md, meta: dict) -> dict:
    """block_size, the cache writer's DCP size and interleave, and the sequence lengths of this batch as
    vLLM passed them: seq_lens [R], and local_seq_lens [R] where vLLM computed them (the model runner's
    dcp_local_seq_lens, seen by the metadata builder; the decode metadata's seq_lens of dense MLA under
    DCP). Device tensors stay on the device (staged with each record, no host sync)."""
    out = {}
    if isinstance(getattr(md, "block_size", None), int):
        out["block_size"] = md.block_size
    if WRITER:
        out.update(WRITER)
    else:  # no block table seen in this process: the process group's DCP, marked as such
        out.update(kv_dcp_size=meta["group_dcp_size"], kv_dcp_source="group")
        if isinstance(getattr(md, "cp_kv_cache_interleave_size", None), int):
            out["interleave"] = md.cp_kv_cache_interleave_size
    num_reqs = getattr(md, "num_reqs", None)
    seq_lens = getattr(md, "seq_lens", None)
    if seq_lens is not None and isinstance(num_reqs, int):
        out["seq_lens"] = seq_lens[:num_reqs]  # [R]
    local = getattr(md, "_tensortap_local_seq_lens", None)
    decode = getattr(md, "decode", None)
    if local is None and getattr(decode, "dcp_tot_seq_lens", None) is not None:
        local = decode.seq_lens  # dense MLA: the builder put the local lengths there
    if local is not None and isinstance(num_reqs, int):
        out["local_seq_lens"] = local[:num_reqs]  # [R]
    return out


def enter(module):
    """The one question per layer call: (info, step, spec_pos, wanted points) of a noted layer that has
    points the filter's per-name part keeps, outside warm-ups; else None (one dict lookup, mostly)."""
    info = getattr(module, "_tensortap", None)
    if info is None:
        return None
    step, spec_pos = STEPS.enter(info)
    if tensortap.current_config() is not info.config:
        WANTED.get(info)
    phase = ENGINE.phase
    if not info.points or phase == "warmup":
        return None
    if phase is not None:
        step = max(ENGINE.step, 0)
    if WANTED.step == step and WANTED.forwards.get((info.role, spec_pos)) is False:
        return None  # this step (role, draft pass) was asked already and is not wanted
    return info, step, spec_pos, info.points


def _open(module, kind: str, metadata, args, kwargs, entered) -> _Forward | None:
    """The tapped forward of one layer call; None when its step or rank is not wanted, or it is a start-up
    forward (warm-up and profiling: not recorded; graph capture: only where points feed graph slots)."""
    info, step, spec_pos, wanted = entered
    graph_only = ENGINE.phase == "capture"
    if graph_only and not (state.graph_slots() and state.capturing()):
        return None
    meta = dict(step=step, layer=info.layer, role=info.role, spec_pos=spec_pos)
    prefix = f"layers.{info.layer}.attn."
    if not WANTED.forward(prefix + next(iter(wanted)), meta):
        return None
    md = metadata(module, args, kwargs)
    if md is None:
        return None
    meta.update(_layer_meta(module))
    meta.update(_batch_meta(md, meta))
    return _Forward(prefix, wanted, meta, module.num_heads, meta["tp_rank"], kind, md.num_actual_tokens, md=md,
                    graph_only=graph_only)


def point(fwd: _Forward, point: str, tensor, **meta) -> None:
    if point in fwd.wanted and (not fwd.graph_only or state.capturing()):
        tensortap.point(fwd.prefix + point, tensor, **meta)


def layer_call(kind: str, module, metadata, args, kwargs, call, after=None, entered=None):
    """Run one layer call inside its tapped forward; calls nested in an open forward pass straight through.
    `after(fwd, result)` runs (guarded) on the call's result inside the forward's scope; `entered`: what
    `enter(module)` gave, when the caller asked it already."""
    if ACTIVE.get() is not None:
        return call()
    if not entered:
        entered = guarded(enter, module)
        if entered is None:
            return call()
    fwd = guarded(_open, module, kind, metadata, args, kwargs, entered)
    if fwd is None:
        return call()
    token = ACTIVE.set(fwd)
    try:
        with tensortap.scope(**fwd.meta):
            result = call()
            if after is not None:
                guarded(after, fwd, result)
            return result
    finally:
        ACTIVE.reset(token)


# -- the layers' own methods -------------------------------------------------------------------------------
def dsa_metadata(module, args, kwargs):
    """This layer's attention metadata from the forward context (None in profiling runs)."""
    from vllm import forward_context
    from vllm.model_executor.layers.attention import attention

    if not forward_context.is_forward_context_available():
        return None
    return attention.get_attention_context(module.layer_name)[0]


def impl_metadata(module, args, kwargs):
    """forward_impl(q, k_c_normed, k_pe, kv_cache, attn_metadata, output, ...): its attention metadata."""
    return kwargs["attn_metadata"] if "attn_metadata" in kwargs else args[4]
