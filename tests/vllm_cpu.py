"""vLLM 0.33.0's own objects, built and run on the CPU for the plugin tests (docs/serving.md lists them).

Real: VllmConfig, ParallelConfig, CacheConfig, AttentionConfig, SpeculativeConfig.create_draft_parallel_config,
DeepseekV32Attention (with its indexer, linear layers, RMSNorms, RoPE), MLAAttention.__init__,
FlashMLASparseImpl (its DCP belief from AttentionImplBase.__new__), MLADCPManager (its _init_combine binding),
FlashMLASparseMetadata, V1's BlockTable, the forward context, set_model_tag, fused_allreduce_rms_norm, and
every line of Python between the kernels: DeepseekV32Attention.forward and _sparse_indexer_and_attn,
FlashMLASparseImpl.forward_mqa and its fp8 mixed-batch path, the DCP query gather and combine calls.

Faked, because they need CUDA, Triton or NCCL: the Triton kernels (fused_norm_rope, fused_q, the lightning
indexer's top-k: it writes TOPK_IDS, concat_mla_q, triton_filter_and_convert_dcp_index and the DCP 1
conversion: the reference's filter_and_convert), the FlashMLA fp8 sparse kernel (the reference's sparse MLA
attention over the dumped fp8_ds_mla cache, so the oracle agrees), the DCP combine cp_lse_ag_out_rs
(all ranks hold this rank's partials: the merge returns the rank's own heads), the process groups (_TP and
_DCP: world size and rank; all_gather stacks copies scaled per rank), the index group's CUDA event between
the indexer and the conversion (set_logical_topk_ready), the TP all-reduce (times TP) and
flashinfer's fused all-reduce + RMSNorm, torch.accelerator.empty_cache, the MLA prefill backend choice
(none on the CPU), and ModelConfig (a stub with max_model_len, hf_text_config and dtype: a real one reads a
checkpoint directory and probes the model registry in a subprocess, about 50 s here).
"""

from __future__ import annotations

import os

import pytest
import torch

REQUIRED = os.environ.get("CI") == "true" or os.environ.get("TENSORTAP_REQUIRE_VLLM") == "1"


def import_vllm():
    """vLLM, or skip; where it is expected (CI, TENSORTAP_REQUIRE_VLLM=1) a failed import fails instead."""
    if REQUIRED:
        import vllm  # noqa: F401  (ImportError here: install requirements/vllm-cpu.txt)

        return vllm
    return pytest.importorskip("vllm")


import_vllm()

from types import SimpleNamespace  # noqa: E402

from transformers import DeepseekV3Config  # noqa: E402
from vllm.config import (  # noqa: E402
    AttentionConfig, CacheConfig, DeviceConfig, ParallelConfig, SpeculativeConfig, VllmConfig,
    set_current_vllm_config)
from vllm.distributed import parallel_state  # noqa: E402
from vllm.forward_context import set_forward_context  # noqa: E402
from vllm.model_executor.layers.attention import mla_attention  # noqa: E402
from vllm.models.common.ops import fused_allreduce_rms_norm as far  # noqa: E402
from vllm.models.deepseek_v32 import attention as dsa  # noqa: E402
from vllm.v1.attention.backends.mla import flashmla_sparse, index_group, sparse_utils  # noqa: E402
from vllm.v1.attention.ops import dcp  # noqa: E402
from vllm.v1.worker import block_table as v1_block_table  # noqa: E402

from tensortap.mla import attention as ref_attention  # noqa: E402
from tensortap.mla import kvcache, sharding  # noqa: E402

# TP4/DCP4 on global rank 1: DCP group {0, 1, 2, 3}, group rank 1; 16 heads, 4 per rank.
TP, DCP, RANK = 4, 4, 1
HEADS, LOCAL, HIDDEN, V, BS, TOPK, NUM_LAYERS = 16, 4, 64, 4, 64, 8, 4
SEQ_LENS = torch.tensor([70, 9, 200], dtype=torch.int32)  # [R]
TABLE = torch.tensor([[3, 1, 0, 0], [2, 0, 0, 0], [4, 5, 6, 7]], dtype=torch.int32)  # [R, nb]
TOPK_IDS = torch.tensor([[0, 1, 5, 64, 69, -1, 2, 3], [0, 4, 8, -1, -1, -1, -1, -1],  # [T, K]
                         [1, 5, 9, 13, 133, 199, -1, 150]], dtype=torch.int32)
NUM_BLOCKS = 8


class Group:
    """A process group as vLLM's GroupCoordinator shows it to the layer (hashable: vLLM caches on it)."""

    def __init__(self, world_size: int, rank: int):
        self.world_size, self.rank_in_group, self.rank, self.local_rank = world_size, rank, rank, rank
        self.ranks = list(range(world_size))
        self.device_group = self.cpu_group = None

    def all_gather(self, x, dim=-1):
        """Rank r's part is x * (r + 1): each rank's query differs, this rank's is at its place (r = RANK)."""
        return torch.cat([x * (r + 1) / (self.rank_in_group + 1) for r in range(self.world_size)], dim=dim)


def hf_config(num_hidden_layers: int = NUM_LAYERS) -> DeepseekV3Config:
    config = DeepseekV3Config(hidden_size=HIDDEN, num_attention_heads=HEADS, q_lora_rank=32, kv_lora_rank=512,
                              qk_nope_head_dim=16, qk_rope_head_dim=64, v_head_dim=V,
                              num_hidden_layers=num_hidden_layers, vocab_size=128, max_position_embeddings=1024,
                              rms_norm_eps=1e-6, rope_theta=10000.0)
    config.index_topk, config.index_n_heads, config.index_head_dim = TOPK, 4, 128
    return config


def vllm_config(parallel: ParallelConfig, stub: bool = True) -> VllmConfig:
    """A real VllmConfig around `parallel`; ModelConfig is the stub the module docstring describes
    (`stub=False`: none yet, for vLLM code that revalidates the config; then `with_model(config)`)."""
    config = VllmConfig(parallel_config=parallel, cache_config=CacheConfig(block_size=BS, cache_dtype="fp8_ds_mla"),
                        device_config=DeviceConfig(device="cpu"),
                        attention_config=AttentionConfig(sparse_mla_prefill_workspace_factor=2))
    return with_model(config) if stub else config


def with_model(config: VllmConfig) -> VllmConfig:
    hf = hf_config()
    object.__setattr__(config, "model_config", SimpleNamespace(max_model_len=1024, hf_text_config=hf, hf_config=hf,
                                                               dtype=torch.float32))
    return config


def target_parallel(**extra) -> ParallelConfig:
    return ParallelConfig(tensor_parallel_size=TP, decode_context_parallel_size=DCP, **extra)


def draft_parallel(target: ParallelConfig) -> ParallelConfig:
    """vLLM 0.33.0's own draft parallel config for a draft at the target's TP (it leaves DCP at 1)."""
    return SpeculativeConfig.create_draft_parallel_config(target, TP)


# -- kernel and collective fakes --------------------------------------------------------------------------------
def fake_filter_and_convert(req_id, block_table, token_indices, dcp_size, dcp_rank, cp_kv_cache_interleave_size=1,
                            BLOCK_SIZE=64, BLOCK_STRIDE_ROWS=None, NUM_TOPK_TOKENS=2048, BLOCK_N=128,
                            return_valid_counts=False, compact_valid_to_front=True):
    """triton_filter_and_convert_dcp_index without Triton: the reference's filter_and_convert."""
    slots = sharding.filter_and_convert(token_indices, req_id.long(), block_table, BLOCK_SIZE, dcp_size, dcp_rank,
                                        cp_kv_cache_interleave_size)  # [T, K]
    return (slots, (slots >= 0).sum(-1).int()) if return_valid_counts else slots


def fake_group_convert(self, layer_index, logical_topk_indices, attn_metadata, *, block_stride_rows,
                       return_valid_counts):
    """SparseMLAIndexGroup's DCP 1 conversion without Triton: replicated addressing."""
    rows = logical_topk_indices.shape[0]
    return fake_filter_and_convert(attn_metadata.req_id_per_token[:rows], attn_metadata.block_table,
                                   logical_topk_indices, 1, 0, BLOCK_SIZE=attn_metadata.block_size,
                                   return_valid_counts=return_valid_counts)


def fake_flash_mla(self, q, kv_c_and_k_pe_cache, topk_indices, kernel_metadata):
    """FlashMLA's fp8 sparse decode on the CPU: the reference's attention over the fp8_ds_mla pages.
    q [1, T, H, 576], pages [P, 64, 656], indices [1, T, K] -> out [1, T, H, 512], lse [1, H, T] (natural log)."""
    cache = kvcache.KVCache.__new__(kvcache.KVCache)
    cache.data, cache.block_size = kv_c_and_k_pe_cache, kv_c_and_k_pe_cache.shape[1]
    out, lse = ref_attention.sparse_mla_decode(q[0].float(), cache, topk_indices[0].long(), self.softmax_scale)
    return out[None], lse.transpose(0, 1)[None]  # [1, T, H, 512], [1, H, T]


def fake_combine(partial_output, partial_lse, cp_group, is_lse_base_on_e=True, seq_lens=None,
                 query_start_loc=None, **kwargs):
    """cp_lse_ag_out_rs without Triton/NCCL: every rank holds these partials, so the LSE merge returns them
    unchanged and the reduce-scatter leaves this rank its own heads [T, Hl, 512]."""
    heads = partial_output.shape[1] // cp_group.world_size
    return partial_output[:, cp_group.rank_in_group * heads:(cp_group.rank_in_group + 1) * heads].contiguous()


def fake_fused_norm_rope(positions, q_c, *args, **kwargs):
    """fused_norm_rope without Triton: q_c as it is (the cache write is the test's)."""
    return q_c


def fake_fused_q(positions, q_pe, *args, **kwargs):
    """fused_q without Triton: (index q, index weights, mqa q_pe)."""
    return torch.zeros(q_pe.shape[0], 4, 128), torch.ones(q_pe.shape[0], 4), q_pe


def fake_indexer(*args, **kwargs):
    """The lightning indexer's top-k without its kernels: the global token ids TOPK_IDS."""
    buffer = args[13] if len(args) > 13 else kwargs["topk_indices_buffer"]
    buffer[: TOPK_IDS.shape[0]] = TOPK_IDS


def fake_concat_mla_q(ql_nope, q_pe, out):
    out.copy_(torch.cat([ql_nope, q_pe], dim=-1))  # [T, Hl, 576]


def fake_fused_all_reduce(allreduce_in, residual, rms_gamma, rms_eps, world_size, norm_out, **kwargs):
    """flashinfer's all-reduce + residual + RMSNorm: new residual into allreduce_in, normed into norm_out."""
    summed = allreduce_in * world_size + residual  # [T, C]
    allreduce_in.copy_(summed)
    norm_out.copy_(summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + rms_eps) * rms_gamma)


def install_fakes(monkeypatch, fused: bool = False) -> None:
    """The fakes above, in place before register() wraps what it wraps."""
    for module in (sparse_utils, flashmla_sparse):
        monkeypatch.setattr(module, "triton_filter_and_convert_dcp_index", fake_filter_and_convert)
    monkeypatch.setattr(index_group.SparseMLAIndexGroup, "convert_logical_to_physical_topk", fake_group_convert)
    monkeypatch.setattr(index_group.SparseMLAIndexGroup, "set_logical_topk_ready", lambda self, layer_index: None)
    monkeypatch.setattr(flashmla_sparse.FlashMLASparseImpl, "_fp8_flash_mla_kernel", fake_flash_mla)
    monkeypatch.setattr(flashmla_sparse.ops, "concat_mla_q", fake_concat_mla_q)
    monkeypatch.setattr(flashmla_sparse, "get_mla_metadata", lambda *a, **k: (None, None))
    monkeypatch.setattr(dcp, "cp_lse_ag_out_rs", fake_combine)
    monkeypatch.setattr(dsa, "fused_norm_rope", fake_fused_norm_rope)
    monkeypatch.setattr(dsa, "fused_q", fake_fused_q)
    monkeypatch.setattr(dsa, "sparse_attn_indexer", fake_indexer)
    monkeypatch.setattr(mla_attention, "get_mla_prefill_backend", _no_prefill_backend)
    monkeypatch.setattr(torch.accelerator, "empty_cache", lambda: None)
    monkeypatch.setattr(far, "tensor_model_parallel_all_reduce", lambda x: x * TP)
    monkeypatch.setattr(far, "get_tensor_model_parallel_world_size", lambda: TP)
    if fused:
        monkeypatch.setattr(far, "flashinfer_trtllm_fused_allreduce_norm", fake_fused_all_reduce)
        monkeypatch.setattr(far, "_can_use_flashinfer", lambda x, tp: (True, 1024))
    monkeypatch.setattr(parallel_state, "_TP", Group(TP, RANK))
    monkeypatch.setattr(parallel_state, "_DCP", Group(DCP, RANK))
    from vllm.v1.worker import workspace

    if workspace._manager is None:
        workspace.init_workspace_manager(torch.device("cpu"))


def _no_prefill_backend(vllm_config):
    raise ValueError("no MLA prefill backend on the CPU")


# -- layers, batches, one decode ----------------------------------------------------------------------------------
def make_layer(config: VllmConfig, index: int, gen_seed: int = 0) -> "dsa.DeepseekV32Attention":
    """A real DeepseekV32Attention on the FlashMLA sparse backend under `config`, weights seeded."""
    with set_current_vllm_config(config):
        layer = dsa.DeepseekV32Attention(config, config.model_config.hf_text_config,
                                         prefix=f"model.layers.{index}.self_attn",
                                         topk_indices_buffer=torch.full((64, TOPK), -1, dtype=torch.int32),
                                         attn_backend=flashmla_sparse.FlashMLASparseBackend)
    gen = torch.Generator().manual_seed(gen_seed + index)
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    layer.W_UK_T = torch.randn(LOCAL, 16, 512, generator=gen) * 0.2  # [Hl, nope, 512]: from kv_b_proj at load
    layer.W_UV = torch.randn(LOCAL, 512, V, generator=gen) * 0.2  # [Hl, 512, v]
    return layer


def make_cache(seed: int = 0) -> torch.Tensor:
    """An fp8_ds_mla cache [blocks, 64, 656] of random latents, packed as vLLM packs them."""
    gen = torch.Generator().manual_seed(seed)
    kv_c = torch.randn(NUM_BLOCKS * BS, 512, generator=gen)  # [N, 512]
    k_pe = torch.randn(NUM_BLOCKS * BS, 64, generator=gen)  # [N, 64]
    return kvcache.pack(kv_c, k_pe).view(NUM_BLOCKS, BS, 656)  # [blocks, bs, 656]


def make_metadata(local_seq_lens: torch.Tensor | None = None):
    """The builder's FlashMLASparseMetadata for three decode requests, one token each (fp8 mixed batch)."""
    kernel = flashmla_sparse.FlashMLASparseMetadata.FP8KernelMetadata(None, torch.empty(3, 1, dtype=torch.int32),
                                                                      torch.full((1,), 1024, dtype=torch.int32))
    md = flashmla_sparse.FlashMLASparseMetadata(
        num_reqs=3, max_query_len=1, max_seq_len=int(SEQ_LENS.max()), num_actual_tokens=3,
        query_start_loc=torch.arange(4, dtype=torch.int32), slot_mapping=torch.full((3,), -1, dtype=torch.int64),
        num_decodes=3, num_decode_tokens=3, num_prefills=0, block_table=TABLE,
        req_id_per_token=torch.arange(3, dtype=torch.int32), seq_lens=SEQ_LENS, block_size=BS, topk_tokens=TOPK,
        fp8_extra_metadata=kernel, fp8_use_mixed_batch=True)
    if local_seq_lens is not None:
        md._tensortap_local_seq_lens = local_seq_lens  # as engine.wrap_metadata_build attaches them
    return md


def block_table(pin: bool = False):
    """V1's real BlockTable (its DCP size and rank from the _DCP process group)."""
    return v1_block_table.BlockTable(BS, 4, 8, 64, pin, torch.device("cpu"), 1)


def decode(layer, config, md, cache, hidden, **context):
    """One layer call under vLLM's forward context, then fused_allreduce_rms_norm (the decoder's next op).
    Returns (o_proj partial before the all-reduce, normed output)."""
    layer.kv_cache = cache
    positions = SEQ_LENS.long() - 1  # [T]
    with set_forward_context({layer.layer_name: md}, config, slot_mapping={layer.layer_name: md.slot_mapping},
                             **context):
        partial = layer(positions, hidden)  # [T, C]
    reference = partial.clone()
    normed, _ = far.fused_allreduce_rms_norm(partial, torch.zeros_like(partial), _Norm())
    return reference, normed


class _Norm(torch.nn.Module):
    """RMSNorm(x + residual) -> (normed, new residual), vLLM's fused-add signature."""

    weight = torch.ones(HIDDEN)
    variance_epsilon = 1e-6

    def forward(self, x, residual):
        summed = x + residual  # [T, C]
        return summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-6), summed
