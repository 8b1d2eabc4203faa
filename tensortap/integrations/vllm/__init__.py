"""vLLM 0.33.0 plugin: tap points on the MLA decode path (DESIGN section 3), switched on by TAP.

`register()` is the `vllm.general_plugins` entry point, run in every vLLM process before the model is
built. TAP unset, empty or "0": it returns at once, importing and patching nothing. Otherwise it validates
TAP (`tensortap.configure`) and patches the targets below, at class or module level, without importing
any of vLLM's modules: a module already imported is patched at once, the others by an import hook right
after vLLM imports them itself (a process that never builds a model pays for neither).

  MLAAttention.__init__                 layer index and role; wraps its impl class's forward_mqa
  <impl class>.forward_mqa              block_table, q (as consumed: after the DCP all-gather, or replicated
                                        under dcp_q_replicate), partial_out, lse; merged_out at DCP 1
  triton_filter_and_convert_dcp_index   topk (input), slots (output) of DCP > 1, then kv_pages; rebound in
                                        sparse_utils, sparse_mla_attention, flashmla_sparse
  triton_convert_req_index_to_global_index  the same for DCP 1 (sparse_mla_attention, flashmla_sparse)
  SparseMLAIndexGroup.convert_logical_to_physical_topk   topk, slots, kv_pages of DCP 1 decode
  MLADCPManager._init_combine           merged_out (wraps the combine it binds at build time)
  DeepseekV32Attention.forward          the layer's scope; o_proj_partial (reduce_results=False)
  DeepseekV32Attention._sparse_indexer_and_attn   attn_out; its own scope when replayed alone
  MLAAttention.forward_impl, _v_up_proj the scope and attn_out of other MLA models
  fused_allreduce_rms_norm: tensor_model_parallel_all_reduce      hidden (hidden_kind=sum)
                            flashinfer_trtllm_fused_allreduce_norm hidden (hidden_kind=post_norm)
  engine.py: GPUModelRunner (V1 and V2) execute_model, sample_tokens, _dummy_run, profile_run,
  capture_model; CudaGraphManager.capture/run_fullgraph; CUDAGraphWrapper.__call__;
  BreakableCUDAGraphWrapper._capture/_replay; BreakableCUDAGraphCapture.add_eager;
  BlockTables/BlockTable.__init__; SparseMLACommonMetadataBuilder.build.

Metadata is what vLLM used: dcp_size/dcp_rank from the impl (AttentionImplBase.__new__), group_dcp_* from
the DCP process group, kv_dcp_size/interleave from the cache writer's block table (kv_dcp_source says
where they came from), local_seq_lens as vLLM computed them, lse_base from the backend (FlashInfer's
sparse MLA returns base 2), step/phase/req_ids from the model runner (engine.py). Layer: `layers.<L>` in
the layer's name. Role: "draft" when built under a speculative model tag (eagle_head, draft_model,
dspark_head, dflash_head) or when L >= the model's num_hidden_layers (MTP), else "target"; spec_pos:
draft passes since the step's target forward.

Not captured: o_proj_partial and hidden outside DeepseekV32Attention (RowParallelLinear reduces inside),
under sequence-parallel MoE or at TP 1; lse when the impl believes DCP 1 (vLLM drops it); warm-up,
profiling and capture forwards (see engine.py); points inside a captured graph unless tensortap's graph
runtime turns them into graph slots; kv_pages inside a graph capture (data-dependent shape); topk/slots
of HiSparse caches and prefill-workspace conversions (one conversion per forward_mqa is kept).
"""

from __future__ import annotations

import os

_MLA = "vllm.model_executor.layers.attention.mla_attention"
_SPARSE = "vllm.model_executor.layers.attention.sparse_mla_attention"
_FLASHMLA = "vllm.v1.attention.backends.mla.flashmla_sparse"
_DSA = "vllm.models.deepseek_v32.attention"
_FAR = "vllm.models.common.ops.fused_allreduce_rms_norm"
_FILTER, _CONVERT = "triton_filter_and_convert_dcp_index", "triton_convert_req_index_to_global_index"
_RUNNERS = ("vllm.v1.worker.gpu.model_runner", "vllm.v1.worker.gpu_model_runner")
_REGISTERED = False
_HOOK = None


def register() -> None:
    """vLLM general-plugin hook: with TAP set, validate it and patch the MLA decode path (once per process)."""
    global _REGISTERED, _HOOK
    value = os.environ.get("TAP")
    if value is None or value.strip() in ("", "0") or _REGISTERED:
        return
    import tensortap
    from tensortap.integrations.vllm import patching

    tensortap.configure(value)  # a malformed TAP raises TapConfigError: start-up fails with its one line
    _REGISTERED = True
    pending: dict[str, list] = {}
    for module_name, path, make_wrapper in targets():
        pending.setdefault(module_name, []).append((path, make_wrapper))
    _HOOK = patching.install(pending)


def unregister() -> None:
    """Restore every patched attribute, drop the import hook, reset the counters (tests, or to leave vLLM
    untouched)."""
    global _REGISTERED, _HOOK
    from tensortap.integrations.vllm import layers, patching, state

    patching.uninstall(_HOOK)
    _HOOK = None
    patching.restore_all()
    layers.reset()
    state.reset()
    _REGISTERED = False


def targets() -> tuple:
    """(module, dotted attribute, wrapper factory) of every patch, in patch order."""
    from tensortap.integrations.vllm import engine, points

    runner = tuple((module, f"GPUModelRunner.{method}", make) for module in _RUNNERS for method, make in (
        ("execute_model", engine.wrap_execute_model), ("sample_tokens", engine.wrap_sample_tokens),
        ("_dummy_run", engine.wrap_warmup), ("profile_run", engine.wrap_warmup),
        ("capture_model", engine.wrap_capture)))
    return (
        (_MLA, "MLAAttention.__init__", points.wrap_init),
        (_MLA, "MLAAttention.forward_impl", points.wrap_forward_impl),
        (_MLA, "MLAAttention._v_up_proj", points.wrap_v_up),
        (_DSA, "DeepseekV32Attention.forward", points.wrap_dsa_forward),
        (_DSA, "DeepseekV32Attention._sparse_indexer_and_attn", points.wrap_dsa_attn),
        ("vllm.v1.attention.ops.dcp", "MLADCPManager._init_combine", points.wrap_init_combine),
        ("vllm.v1.attention.backends.mla.sparse_utils", _FILTER, points.wrap_convert),
        (_SPARSE, _FILTER, points.wrap_convert),
        (_FLASHMLA, _FILTER, points.wrap_convert),
        (_SPARSE, _CONVERT, points.wrap_convert),
        (_FLASHMLA, _CONVERT, points.wrap_convert),
        ("vllm.v1.attention.backends.mla.index_group", "SparseMLAIndexGroup.convert_logical_to_physical_topk",
         points.wrap_group_convert),
        (_FAR, "tensor_model_parallel_all_reduce", points.wrap_all_reduce),
        (_FAR, "flashinfer_trtllm_fused_allreduce_norm", points.wrap_fused_all_reduce),
        (_SPARSE, "SparseMLACommonMetadataBuilder.build", engine.wrap_metadata_build),
        ("vllm.v1.worker.gpu.block_table", "BlockTables.__init__", engine.wrap_block_tables_init),
        ("vllm.v1.worker.block_table", "BlockTable.__init__", engine.wrap_block_table_init),
        *runner,
        ("vllm.v1.worker.gpu.cudagraph_utils", "CudaGraphManager.capture", engine.wrap_capture),
        ("vllm.v1.worker.gpu.cudagraph_utils", "CudaGraphManager.run_fullgraph", engine.wrap_replay),
        ("vllm.compilation.cuda_graph", "CUDAGraphWrapper.__call__", engine.wrap_graph_wrapper_call),
        ("vllm.compilation.breakable_cudagraph", "BreakableCUDAGraphWrapper._capture", engine.wrap_capture),
        ("vllm.compilation.breakable_cudagraph", "BreakableCUDAGraphWrapper._replay", engine.wrap_replay),
        ("vllm.compilation.breakable_cudagraph", "BreakableCUDAGraphCapture.add_eager", engine.wrap_add_eager),
    )
