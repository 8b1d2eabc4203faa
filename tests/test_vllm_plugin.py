"""The vLLM plugin (tensortap.integrations.vllm) against the vLLM 0.33.0 sources, on the CPU.

vLLM's Triton/CUDA kernels do not run here, so each test replaces the innermost kernels with small
pure-torch fakes *before* register() wraps them: the FlashMLA sparse kernel, the index conversion
(the reference's filter_and_convert), the DCP collectives and the TP all-reduce. What runs between
them is vLLM's own code: DeepseekV32Attention._sparse_indexer_and_attn, FlashMLASparseImpl.forward_mqa
and its mixed-batch fp8 path, fused_allreduce_rms_norm. Skipped where vLLM is not installed (CI).
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.compilation.backends import set_model_tag  # noqa: E402
from vllm.distributed import parallel_state  # noqa: E402
from vllm.model_executor.layers.attention import attention as attention_module  # noqa: E402
from vllm.model_executor.layers.attention import mla_attention  # noqa: E402
from vllm.models.common.ops import fused_allreduce_rms_norm as far  # noqa: E402
from vllm.models.deepseek_v32 import attention as dsa  # noqa: E402
from vllm.v1.attention.backends.mla import flashmla_sparse, index_group, sparse_utils  # noqa: E402
from vllm.v1.attention.ops import dcp  # noqa: E402

import tensortap  # noqa: E402
from tensortap.mla import sharding  # noqa: E402

# TP8 / DCP4 on global rank 5: DCP group {4, 5, 6, 7}, group rank 1; 16 heads, 2 per rank.
TP_RANK, TP_SIZE, DCP_SIZE, GROUP_RANK = 5, 8, 4, 1
HEADS, LOCAL, V, BS, TOPK, NUM_LAYERS = 16, 2, 4, 64, 8, 78
SEQ_LENS = torch.tensor([70, 9, 200], dtype=torch.int32)  # [R]
TABLE = torch.tensor([[3, 1, 0, 0], [2, 0, 0, 0], [4, 5, 6, 0]], dtype=torch.int32)  # [R, nb]
TOPK_IDS = torch.tensor([[0, 1, 5, 64, 69, -1, 2, 3], [0, 4, 8, -1, -1, -1, -1, -1],  # [T, K]
                         [1, 5, 9, 13, 133, 199, -1, 150]], dtype=torch.int32)


@pytest.fixture
def plugin(monkeypatch):
    """The plugin module; every patch it made is undone before monkeypatch restores vLLM's originals."""
    from tensortap.integrations import vllm as plugin

    monkeypatch.setattr(plugin, "_WARNED", set())
    monkeypatch.delenv("TAP", raising=False)
    yield plugin
    plugin.unregister()
    tensortap.close()


def _originals(plugin) -> dict:
    found = {}
    for module_name, path, _ in plugin._targets():
        owner = __import__(module_name, fromlist=["_"])
        for part in path.split("."):
            owner = getattr(owner, part)
        found[(module_name, path)] = owner
    return found


# -- (a) disabled: nothing patched ------------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, "", "0", "  0 "])
def test_disabled_patches_nothing(plugin, monkeypatch, value):
    if value is not None:
        monkeypatch.setenv("TAP", value)
    before = _originals(plugin)
    plugin.register()
    after = _originals(plugin)
    assert all(after[key] is before[key] for key in before)
    assert plugin._PATCHES == [] and not tensortap.enabled()


def test_disabled_register_imports_nothing_heavy():
    code = ("import sys; from tensortap.integrations import vllm as p; p.register(); "
            "print(sorted(m for m in ('torch', 'vllm', 'tensortap.capture') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "TAP"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- (b) enabled: patched once, TAP validated ----------------------------------------------------------
def test_enabled_patches_each_target_once(plugin, monkeypatch, tap_dir):
    monkeypatch.setenv("TAP", tap_dir)
    before = _originals(plugin)
    plugin.register()
    after = _originals(plugin)
    for key, original in before.items():
        assert after[key] is not original, key
        assert after[key].__tensortap_original__ is original, key
    assert tensortap.enabled() and tensortap.current_config().dir == tap_dir
    patches = list(plugin._PATCHES)
    plugin.register()
    assert plugin._PATCHES == patches and _originals(plugin) == after
    plugin.unregister()
    assert _originals(plugin) == before


@pytest.mark.parametrize("tap, patched", [("", 0), ("{dir}", 13)])
def test_vllm_loads_the_entry_point(tap_dir, tap, patched):
    """vLLM's own plugin loader finds the pyproject entry point and runs register() (a fresh process)."""
    code = ("from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "from tensortap.integrations import vllm as p; print(len(p._PATCHES))")
    env = {**os.environ, "TAP": tap.format(dir=tap_dir)}
    env.pop("VLLM_PLUGINS", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(patched)


def test_malformed_tap_raises_and_patches_nothing(plugin, monkeypatch, tap_dir):
    monkeypatch.setenv("TAP", f"{tap_dir};layer=3")
    before = _originals(plugin)
    with pytest.raises(tensortap.TapConfigError, match="unknown TAP key 'layer'"):
        plugin.register()
    assert plugin._PATCHES == [] and _originals(plugin) == before


# -- (c) a synthetic decode through vLLM's own code --------------------------------------------------------
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
    return fake_filter_and_convert(attn_metadata.req_id_per_token, attn_metadata.block_table,
                                   logical_topk_indices, 1, 0, BLOCK_SIZE=attn_metadata.block_size,
                                   return_valid_counts=return_valid_counts)


def fake_kernel(self, q, kv_c_and_k_pe_cache, topk_indices, kernel_metadata):
    """FlashMLA's fp8 sparse decode, faked: out = latent q scaled by the row's valid index count."""
    valid = (topk_indices >= 0).sum(-1).float()  # [1, T]
    out = q[..., :512] * valid[..., None, None]  # [1, T, H, 512]
    lse = valid[:, None, :].expand(1, q.shape[2], q.shape[1]).clone()  # [1, H, T]
    return out, lse


def fake_combine_factory(manager, *args, **kwargs):
    """MLADCPManager._init_combine, faked: the 'merge' keeps this rank's heads, times 3."""

    def combine(partial_output, partial_lse, seq_lens=None, query_start_loc=None):
        return partial_output[:, GROUP_RANK * LOCAL:(GROUP_RANK + 1) * LOCAL] * 3  # [T, Hl, 512]

    return combine


def fake_mla_init(self, prefix, impl, manager=None):
    """MLAAttention.__init__, faked: only the attributes the DSA decode reads."""
    torch.nn.Module.__init__(self)
    gen = torch.Generator().manual_seed(len(prefix))
    self.layer_name, self.impl, self.dcp_manager = prefix, impl, manager
    self.num_heads = self.num_local_heads = LOCAL
    self.kv_lora_rank, self.qk_rope_head_dim, self.v_head_dim = 512, 64, V
    self.scale, self.kv_cache_dtype, self.use_pcp = 0.0625, "fp8_ds_mla", False
    self.indexer, self._fp8_kv_needs_view, self._fp8_query = None, False, False
    self.is_aiter_triton_fp4_bmm_enabled = self.is_aiter_triton_fp8_bmm_enabled = self.is_amx_bmm_enabled = False
    self._use_sparse_mha = lambda md: False
    self.W_q = torch.randn(32, LOCAL, 576, generator=gen)  # [C, Hl, 576]
    self.W_UV = torch.randn(LOCAL, 512, V, generator=gen)  # [Hl, 512, v]
    self.W_o = torch.randn(LOCAL * V, 32, generator=gen)  # [Hl*v, C]


def fake_dsa_forward(self, positions, hidden_states):
    """DeepseekV32Attention.forward without its fused Triton kernels: q, then vLLM's own attention call."""
    q = torch.einsum("tc,chd->thd", hidden_states, self.W_q)  # [T, Hl, 576]
    output = torch.empty(hidden_states.shape[0], LOCAL * V)  # [T, Hl*v]
    self._sparse_indexer_and_attn(positions, None, None, None, None, None, None, None, None,
                                  q[..., :512].contiguous(), q[..., 512:].contiguous(), output)
    return output @ self.W_o  # [T, C]: o_proj with reduce_results=False


def fake_forward_impl(self, q, k_c_normed, k_pe, kv_cache, attn_metadata, output, **kwargs):
    """MLAAttention.forward_impl's decode rows (its DCP branch), around vLLM's own _v_up_proj."""
    attn_out, lse = self.impl.forward_mqa(self.dcp_manager.query_gather(q), kv_cache, attn_metadata, self)
    attn_out = self.dcp_manager.combine(attn_out, lse, seq_lens=None, query_start_loc=None)  # [T, Hl, 512]
    self._v_up_proj(attn_out, out=output[: attn_metadata.num_actual_tokens])
    return output


class Workspace:
    def get_simultaneous(self, *specs):
        return (torch.empty(16, LOCAL, 576),)  # FlashMLA's q concat buffer: [max tokens, Hl, 576] (fp8 cache)


def fake_concat_mla_q(ql_nope, q_pe, out):
    out.copy_(torch.cat([ql_nope, q_pe], dim=-1))  # [T, Hl, 576]


@pytest.fixture
def vllm_cpu(plugin, monkeypatch, tap_dir):
    """Fakes in place, TAP set, register() run: returns a builder of DSA layers and the batch."""
    for module in (sparse_utils, flashmla_sparse):
        monkeypatch.setattr(module, "triton_filter_and_convert_dcp_index", fake_filter_and_convert)
    monkeypatch.setattr(index_group.SparseMLAIndexGroup, "convert_logical_to_physical_topk", fake_group_convert)
    monkeypatch.setattr(dcp.MLADCPManager, "_init_combine", fake_combine_factory)
    monkeypatch.setattr(mla_attention.MLAAttention, "__init__", fake_mla_init)
    monkeypatch.setattr(dsa.DeepseekV32Attention, "forward", fake_dsa_forward)
    monkeypatch.setattr(mla_attention.MLAAttention, "forward_impl", fake_forward_impl)
    monkeypatch.setattr(far, "tensor_model_parallel_all_reduce", lambda x: x * TP_SIZE)
    monkeypatch.setattr(far, "get_tensor_model_parallel_world_size", lambda: TP_SIZE)
    monkeypatch.setattr(flashmla_sparse.FlashMLASparseImpl, "_fp8_flash_mla_kernel", fake_kernel)
    monkeypatch.setattr(flashmla_sparse, "current_workspace_manager", Workspace)
    monkeypatch.setattr(flashmla_sparse.ops, "concat_mla_q", fake_concat_mla_q)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: TP_RANK)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: TP_SIZE)
    monkeypatch.setattr(parallel_state, "get_dcp_world_size_and_rank", lambda enabled=True: (DCP_SIZE, GROUP_RANK))
    config = SimpleNamespace(model_config=SimpleNamespace(hf_text_config=SimpleNamespace(num_hidden_layers=NUM_LAYERS)),
                             parallel_config=SimpleNamespace(cp_kv_cache_interleave_size=1, dcp_comm_backend="ag_rs"))
    monkeypatch.setattr("vllm.config.vllm._current_vllm_config", config)
    monkeypatch.setenv("TAP", tap_dir)
    plugin.register()
    batch = make_batch()
    monkeypatch.setattr("vllm.forward_context.is_forward_context_available", lambda: True)
    for module in (attention_module, dsa):
        monkeypatch.setattr(module, "get_attention_context", lambda name: (batch.md, None, batch.cache, None))
    return batch


def make_batch():
    """Three decode requests, one token each, on an fp8_ds_mla cache of 8 blocks."""
    gen = torch.Generator().manual_seed(0)
    kernel_md = flashmla_sparse.FlashMLASparseMetadata.FP8KernelMetadata(None, None, None)
    md = SimpleNamespace(num_actual_tokens=3, num_decode_tokens=3, num_reqs=3, seq_lens=SEQ_LENS, max_seq_len=200,
                         block_table=TABLE, block_size=BS, cp_kv_cache_interleave_size=1,
                         req_id_per_token=torch.arange(3, dtype=torch.int32), fp8_use_mixed_batch=True,
                         fp8_extra_metadata=kernel_md)
    cache = torch.randint(0, 256, (8, BS, 656), dtype=torch.uint8, generator=gen)  # [blocks, bs, 656]
    hidden = torch.randn(3, 32, generator=gen)  # [T, C]
    return SimpleNamespace(md=md, cache=cache, hidden=hidden, positions=SEQ_LENS.long() - 1)


def make_layer(index: int, dcp_size: int, tag: str | None = None, cls=dsa.DeepseekV32Attention):
    """A DeepseekV32Attention (or `cls`) over a FlashMLASparseImpl, built by the wrapped MLAAttention.__init__."""
    impl = object.__new__(flashmla_sparse.FlashMLASparseImpl)
    impl.dcp_world_size, impl.dcp_rank = dcp_size, GROUP_RANK if dcp_size > 1 else 0
    impl.need_to_return_lse_for_decode = dcp_size > 1
    impl.num_heads, impl.q_head_size, impl.kv_lora_rank, impl.kv_cache_dtype = LOCAL, 576, 512, "fp8_ds_mla"
    impl.workspace_specs, impl.index_group_index = (), 0
    impl._indexer, impl._topk_indices_buffer = None, TOPK_IDS.clone()
    impl.index_group = object.__new__(index_group.SparseMLAIndexGroup)
    impl.index_group.num_layers, impl.index_group.has_indexer = 1, False
    manager = None
    if dcp_size > 1:
        gather = lambda q: torch.cat([q * (r + 1) for r in range(DCP_SIZE)], dim=1)  # noqa: E731  [T, N*Hl, 576]
        manager = SimpleNamespace(query_gather=gather, combine=dcp.MLADCPManager._init_combine(None))
    layer = cls.__new__(cls)
    if tag is None:
        mla_attention.MLAAttention.__init__(layer, f"model.layers.{index}.self_attn.attn", impl, manager)
    else:
        with set_model_tag(tag):
            mla_attention.MLAAttention.__init__(layer, f"model.layers.{index}.self_attn.attn", impl, manager)
    return layer


def decode(layer, batch):
    """One layer call and the decoder's post-attention all-reduce + RMSNorm (vLLM's unfused path)."""
    partial = layer(batch.positions, batch.hidden)  # [T, C]
    reference = partial.clone()
    far.fused_allreduce_rms_norm(partial, torch.zeros_like(partial), lambda x, residual: (x + residual, x))
    return reference


def test_dcp4_decode_records_every_point(vllm_cpu, plugin, tap_dir):
    layer = make_layer(3, DCP_SIZE)
    assert hasattr(flashmla_sparse.FlashMLASparseImpl.__dict__["forward_mqa"], "__tensortap_original__")  # at build
    partial = decode(layer, vllm_cpu)
    tensortap.close()
    d = tensortap.open(tap_dir)
    expected = ["block_table", "kv_pages", "q", "topk", "slots", "partial_out", "lse", "merged_out", "attn_out",
                "o_proj_partial", "hidden"]
    assert [r.meta["point"] for r in d.iter()] == expected
    for rec in d.iter():
        m = rec.meta
        assert rec.meta["name"] == f"layers.3.attn.{m['point']}"
        assert (m["step"], m["layer"], m["role"], m["spec_pos"]) == (0, 3, "target", 0)
        assert (m["tp_rank"], m["tp_size"], m["dcp_rank"], m["dcp_size"]) == (TP_RANK, TP_SIZE, GROUP_RANK, DCP_SIZE)
        assert (m["group_dcp_rank"], m["group_dcp_size"], m["kv_dcp_size"], m["interleave"]) == (1, 4, 4, 1)
        assert (m["num_heads"], m["kv_format"], m["block_size"]) == (HEADS, "fp8_ds_mla", BS)
        assert (m["softmax_scale"], m["kv_lora_rank"], m["rope_dim"]) == (0.0625, 512, 64)
        assert list(m["seq_lens"]) == SEQ_LENS.tolist()
        assert list(m["local_seq_lens"]) == sharding.local_seq_lens(SEQ_LENS, 4, 1, 1).tolist()
    offsets = {r.meta["point"]: r.meta.get("head_offset") for r in d.iter()}
    assert offsets["q"] == offsets["partial_out"] == offsets["lse"] == 8  # the DCP group's first head
    assert offsets["merged_out"] == offsets["attn_out"] == TP_RANK * LOCAL

    q_local = torch.einsum("tc,chd->thd", vllm_cpu.hidden, layer.W_q)  # [T, Hl, 576]
    q = torch.cat([q_local * (r + 1) for r in range(DCP_SIZE)], dim=1)  # [T, 8, 576]
    assert torch.equal(d.get("q"), q)
    slots = sharding.filter_and_convert(TOPK_IDS, torch.arange(3), TABLE, BS, DCP_SIZE, GROUP_RANK, 1)
    assert torch.equal(d.get("topk"), TOPK_IDS) and torch.equal(d.get("slots"), slots)
    assert d.record("slots").meta["filter_dcp_size"] == 4 and d.record("slots").meta["filter_dcp_rank"] == 1
    valid = (slots >= 0).sum(-1).float()  # [T]
    out = q[..., :512] * valid[:, None, None]  # [T, 8, 512], vLLM zeroes rows with no local index
    assert torch.equal(d.get("partial_out"), out)
    lse = torch.where(valid[:, None] > 0, valid[:, None], float("-inf")).expand(3, 8)  # [T, 8]
    assert torch.equal(d.get("lse"), lse)
    merged = out[:, 2:4] * 3  # [T, Hl, 512]
    assert torch.equal(d.get("merged_out"), merged)
    attn_out = torch.einsum("thl,hlv->thv", merged, layer.W_UV).reshape(3, -1)  # [T, Hl*v]
    assert torch.allclose(d.get("attn_out"), attn_out, rtol=1e-5, atol=1e-4)
    assert torch.equal(d.get("o_proj_partial"), partial)
    assert torch.equal(d.get("hidden"), partial * TP_SIZE)
    assert torch.equal(d.get("block_table"), TABLE)
    assert not plugin._WARNED  # no tap code failed along the way


def test_generic_mla_path(vllm_cpu, plugin, tap_dir):
    """Other MLA models: forward_impl is the layer's scope and vLLM's _v_up_proj gives attn_out."""
    layer = make_layer(3, DCP_SIZE, cls=mla_attention.MLAAttention)
    q = torch.randn(3, LOCAL, 576)  # [T, Hl, 576]
    output = layer.forward_impl(q, None, None, vllm_cpu.cache, vllm_cpu.md, torch.empty(3, LOCAL * V))
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert list(d.records.point) == ["block_table", "kv_pages", "q", "topk", "slots", "partial_out", "lse",
                                     "merged_out", "attn_out"]
    assert torch.equal(d.get("attn_out"), output) and d.record("attn_out").meta["head_offset"] == TP_RANK * LOCAL
    merged = d.get("merged_out")  # [T, Hl, 512]
    assert torch.allclose(output, torch.einsum("thl,hlv->thv", merged, layer.W_UV).reshape(3, -1), atol=1e-4)
    assert not plugin._WARNED
    plugin.unregister()  # the impl class wrapped at build time is restored too
    assert not hasattr(flashmla_sparse.FlashMLASparseImpl.forward_mqa, "__tensortap_original__")


def test_kv_pages_are_the_batch_block_rows(vllm_cpu, monkeypatch, tap_dir):
    layer = make_layer(3, DCP_SIZE)
    tensortap.configure(f"{tap_dir};points=kv_pages,block_table")
    decode(layer, vllm_cpu)
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert sorted(d.records["point"]) == ["block_table", "kv_pages"]
    page_ids = TABLE[:, :4].reshape(-1)  # width min(4, ceil(200 / 64)) = 4
    rec = d.record("kv_pages")
    assert list(rec.meta["page_ids"]) == page_ids.tolist()
    assert torch.equal(rec.tensor(), vllm_cpu.cache[page_ids.long()])  # [12, 64, 656]


def test_draft_with_dcp1_against_dcp4_group(vllm_cpu, plugin, tap_dir):
    """The facts file's bug: the draft impl believes DCP 1 (no gather, no merge, no LSE) in a DCP4 group."""
    target, draft = make_layer(3, DCP_SIZE), make_layer(NUM_LAYERS, 1, tag="eagle_head")
    assert draft._tensortap.role == "draft" and draft._tensortap.mtp
    for layer in (target, draft, draft, target, draft):
        decode(layer, vllm_cpu)
    tensortap.close()
    rows = tensortap.open(tap_dir).records
    drafts = rows[rows.role == "draft"]
    assert sorted(set(zip(drafts.step, drafts.spec_pos))) == [(0, 0), (0, 1), (1, 0)]
    assert sorted(set(rows[rows.role == "target"].step)) == [0, 1]
    one = drafts[(drafts.step == 0) & (drafts.spec_pos == 0)]
    assert list(one.point) == ["block_table", "kv_pages", "q", "topk", "slots", "partial_out", "merged_out", "attn_out",
                               "o_proj_partial", "hidden"]  # no lse: the impl returns none
    assert set(one.dcp_size) == {1} and set(one.group_dcp_size) == {4} and set(one.layer) == {NUM_LAYERS}
    d = tensortap.open(tap_dir)
    q = d.get("q", role="draft", step=0, spec_pos=0)
    assert q.shape == (3, LOCAL, 576) and d.record("q", role="draft", step=0, spec_pos=0).meta["head_offset"] == 10
    slots = sharding.filter_and_convert(TOPK_IDS, torch.arange(3), TABLE, BS, 1, 0, 1)  # replicated addressing
    assert torch.equal(d.get("slots", role="draft", step=1, spec_pos=0), slots)
    assert not plugin._WARNED


def test_steps_count_forwards_over_layers(vllm_cpu, tap_dir):
    first, second = make_layer(3, DCP_SIZE), make_layer(4, DCP_SIZE)
    for layer in (first, second, first, second):
        decode(layer, vllm_cpu)
    tensortap.close()
    rows = tensortap.open(tap_dir).records
    assert sorted(set(zip(rows.step, rows.layer))) == [(0, 3), (0, 4), (1, 3), (1, 4)]


def test_filter_skips_unwanted_layers(vllm_cpu, tap_dir):
    layer = make_layer(3, DCP_SIZE)
    tensortap.configure(f"{tap_dir};layers=78")
    decode(layer, vllm_cpu)
    assert tensortap.stats()["records"] == 0


# -- (d) the tap never raises into the forward ------------------------------------------------------------
def test_metadata_failure_does_not_reach_the_model(vllm_cpu, monkeypatch, plugin, tap_dir):
    layer = make_layer(3, DCP_SIZE)
    expected = decode(layer, vllm_cpu)
    monkeypatch.setattr(parallel_state, "get_dcp_world_size_and_rank", lambda enabled=True: 1 / 0)
    layer._tensortap_meta = None  # forces the lookup again
    assert torch.equal(decode(layer, vllm_cpu), expected)
    assert plugin._WARNED == {"_open"}


def test_broken_batch_metadata_keeps_the_forward(vllm_cpu, plugin, tap_dir):
    layer = make_layer(3, DCP_SIZE)
    expected = decode(layer, vllm_cpu)
    vllm_cpu.md.block_table = TABLE.clone()
    vllm_cpu.md.num_reqs = "three"  # slicing the block table now fails inside the tap
    vllm_cpu.md.seq_lens = object()
    assert torch.equal(decode(layer, vllm_cpu), expected)
    tensortap.close()
    points = list(tensortap.open(tap_dir).records.point)
    assert points.count("partial_out") == 2 and points.count("block_table") == 1
    assert plugin._WARNED == {"_tap_mqa_inputs"}


def test_combine_outside_a_tapped_forward_only_combines(vllm_cpu):
    combine = dcp.MLADCPManager._init_combine(None)
    out = torch.randn(2, 8, 512)
    assert torch.equal(combine(out, torch.zeros(2, 8)), out[:, 2:4] * 3)
    assert tensortap.stats()["records"] == 0
