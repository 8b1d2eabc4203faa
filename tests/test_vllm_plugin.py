"""The vLLM plugin (tensortap.integrations.vllm) on vLLM 0.33.0's own objects, on the CPU.

tests/vllm_cpu.py builds them (real configs, real DeepseekV32Attention + FlashMLASparseImpl + MLADCPManager,
real FlashMLASparseMetadata and BlockTable) and lists what is faked: the CUDA/Triton kernels, NCCL
collectives and process-group getters. Where vLLM is expected (CI, TENSORTAP_REQUIRE_VLLM=1) a vLLM that
does not import fails these tests instead of skipping them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import vllm_cpu as V  # noqa: E402  (imports vLLM, or skips/fails as above)

import tensortap  # noqa: E402
from tensortap.integrations import vllm as plugin  # noqa: E402
from tensortap.integrations.vllm import patching, pages, state  # noqa: E402
from tensortap.mla import attention as ref_attention, kvcache, sharding  # noqa: E402
from vllm.compilation.backends import set_model_tag  # noqa: E402
from vllm.v1.attention.backends.mla import flashinfer_mla_sparse  # noqa: E402
from vllm.v1.attention.backends.utils import get_dcp_local_seq_lens  # noqa: E402

POINTS_IN_ORDER = ["block_table", "q", "topk", "slots", "kv_pages", "partial_out", "lse", "merged_out", "attn_out",
                   "o_proj_partial", "hidden"]


@pytest.fixture
def plugin_off(monkeypatch):
    """TAP unset; every patch the plugin makes in a test is undone before monkeypatch restores vLLM."""
    monkeypatch.setattr(state, "WARNED", set())
    monkeypatch.delenv("TAP", raising=False)
    yield plugin
    plugin.unregister()
    tensortap.close()


@pytest.fixture
def tapped(plugin_off, monkeypatch, tap_dir):
    """Fakes in place, TAP set, register() run, the cache writer's block table built."""
    V.install_fakes(monkeypatch)
    monkeypatch.setenv("TAP", tap_dir)
    plugin.register()
    V.block_table()
    return tap_dir


def _resolve(module_name, path):
    owner = __import__(module_name, fromlist=["_"])
    for part in path.split("."):
        owner = getattr(owner, part)
    return owner


def _originals() -> dict:
    found = {}
    for module_name, path, _ in plugin.targets():
        try:
            found[(module_name, path)] = _resolve(module_name, path)
        except (ImportError, AttributeError):  # a module this build cannot import on the CPU
            continue
    return found


def run_decode(config, index=3, tag=None, md=None, cache=None, fused=False, monkeypatch=None):
    if tag is None:
        layer = V.make_layer(config, index)
    else:
        with set_model_tag(tag):
            layer = V.make_layer(config, index)
    md = md or V.make_metadata(get_dcp_local_seq_lens(V.SEQ_LENS, V.DCP, V.RANK, 1))
    cache = V.make_cache() if cache is None else cache
    hidden = torch.randn(3, V.HIDDEN, generator=torch.Generator().manual_seed(index))  # [T, C]
    partial, normed = V.decode(layer, config, md, cache, hidden)
    return layer, md, cache, partial, normed


# -- (a) registration ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, "", "0", "  0 "])
def test_disabled_patches_nothing(plugin_off, monkeypatch, value):
    if value is not None:
        monkeypatch.setenv("TAP", value)
    before = _originals()
    plugin.register()
    assert _originals() == before and patching.PATCHES == [] and not patching.hooks()
    assert not tensortap.enabled()


def _fresh(code: str, tap: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TAP", "VLLM_PLUGINS")}
    if tap:
        env["TAP"] = tap
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()


def test_disabled_register_imports_nothing_beyond_the_plugin():
    code = ("import sys; before = set(sys.modules); from tensortap.integrations import vllm as p; p.register(); "
            "print(sorted(m for m in set(sys.modules) - before if not m.startswith('tensortap.integrations')))")
    assert _fresh(code, "")[-1] == "['tensortap', 'tensortap.errors']"  # the package's own __init__ only


def test_tap_set_patches_model_code_only_when_vllm_imports_it(tap_dir):
    """vLLM's own loader finds the entry point; register() imports no model code; the import hook patches
    DeepseekV32Attention when vLLM imports it."""
    code = ("import sys; from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "mods = ('vllm.models.deepseek_v32.attention', 'vllm.model_executor.layers.attention.mla_attention', "
            "'vllm.v1.attention.backends.mla.flashmla_sparse'); print([m in sys.modules for m in mods]); "
            "from vllm.models.deepseek_v32.attention import DeepseekV32Attention as A; "
            "print(hasattr(A.forward, '__tensortap_original__'), hasattr(A._sparse_indexer_and_attn, "
            "'__tensortap_original__'))")
    assert _fresh(code, tap_dir)[-2:] == ["[False, False, False]", "True True"]


def test_enabled_patches_each_target_once(plugin_off, monkeypatch, tap_dir):
    before = _originals()
    monkeypatch.setenv("TAP", tap_dir)
    plugin.register()
    after = _originals()
    for key, original in before.items():
        if original is None:
            continue
        assert after[key] is not original, key
        assert after[key].__tensortap_original__ is original, key
    assert tensortap.enabled() and tensortap.current_config().dir == tap_dir
    patches = list(patching.PATCHES)
    plugin.register()
    assert patching.PATCHES == patches and _originals() == after
    plugin.unregister()
    assert _originals() == before and not patching.hooks()


def test_malformed_tap_raises_and_patches_nothing(plugin_off, monkeypatch, tap_dir):
    monkeypatch.setenv("TAP", f"{tap_dir};layer=3")
    before = _originals()
    with pytest.raises(tensortap.TapConfigError, match="unknown TAP key 'layer'"):
        plugin.register()
    assert patching.PATCHES == [] and _originals() == before


# -- (b) one DCP4 decode through vLLM's own layer ------------------------------------------------------------------
def test_dcp4_decode_records_every_point_with_the_metadata_vllm_used(tapped):
    config = V.vllm_config(V.target_parallel())
    layer, md, cache, partial, _ = run_decode(config)
    assert layer.impl.dcp_world_size == V.DCP and layer.dcp_manager is not None  # vLLM's own DCP belief
    tensortap.close()
    d = tensortap.open(tapped)
    assert [r.meta["point"] for r in d.iter()] == POINTS_IN_ORDER
    local = get_dcp_local_seq_lens(V.SEQ_LENS, V.DCP, V.RANK, 1)  # [R], as the model runner computes them
    for rec in d.iter():
        m = rec.meta
        assert m["name"] == f"layers.3.attn.{m['point']}"
        assert (m["step"], m["layer"], m["role"], m["spec_pos"]) == (0, 3, "target", 0)
        assert (m["tp_rank"], m["tp_size"], m["dcp_rank"], m["dcp_size"]) == (V.RANK, V.TP, V.RANK, V.DCP)
        assert (m["group_dcp_rank"], m["group_dcp_size"], m["kv_dcp_size"], m["interleave"]) == (1, 4, 4, 1)
        assert m["kv_dcp_source"] == "block_table" and m["dcp_comm_backend"] == "ag_rs"
        assert (m["num_heads"], m["kv_format"], m["block_size"], m["lse_base"]) == (V.HEADS, "fp8_ds_mla", 64, "e")
        assert m["softmax_scale"] == pytest.approx(layer.scale) and (m["kv_lora_rank"], m["rope_dim"]) == (512, 64)
        assert m["seq_lens"] == V.SEQ_LENS.tolist() and m["local_seq_lens"] == local.tolist()
        assert m["dcp_q_replicate"] is False
    offsets = {r.meta["point"]: r.meta.get("head_offset") for r in d.iter()}
    assert offsets["q"] == offsets["partial_out"] == offsets["lse"] == 0  # the DCP group's first head
    assert offsets["merged_out"] == offsets["attn_out"] == V.RANK * V.LOCAL

    q = d.get("q")  # [T, 16, 576]: the group's heads after vLLM's query gather
    assert q.shape == (3, V.HEADS, 576) and torch.equal(q[:, 4:8], q[:, 0:4] * 2)  # this rank at its place
    slots = sharding.filter_and_convert(V.TOPK_IDS, torch.arange(3), V.TABLE, 64, V.DCP, V.RANK, 1)  # [T, K]
    assert torch.equal(d.get("topk"), V.TOPK_IDS) and torch.equal(d.get("slots"), slots)
    cache_obj = kvcache.KVCache.__new__(kvcache.KVCache)
    cache_obj.data, cache_obj.block_size = cache, 64
    out, lse = ref_attention.sparse_mla_decode(q, cache_obj, slots.long(), layer.impl.softmax_scale)
    out, lse = ref_attention.neutralise_lonely_rows(out, lse, slots)  # vLLM's (0, -inf) for empty rows
    assert torch.equal(d.get("partial_out"), out) and torch.equal(d.get("lse"), lse)
    assert torch.equal(d.get("merged_out"), out[:, 4:8])
    assert torch.equal(d.get("o_proj_partial"), partial) and torch.equal(d.get("hidden"), partial * V.TP)
    assert d.record("hidden").meta["hidden_kind"] == "sum"
    assert torch.equal(d.get("block_table"), V.TABLE)
    pages_expected = pages.page_ids(V.TOPK_IDS, slots, V.TABLE, torch.arange(3), 64, V.NUM_BLOCKS, 4, 1, 1, None)
    rec = d.record("kv_pages")
    assert rec.meta["page_ids"] == pages_expected.tolist() and torch.equal(rec.tensor(), cache[pages_expected.long()])
    assert not state.WARNED  # no tap code failed along the way


def test_draft_under_vllms_draft_parallel_config(tapped):
    """vLLM 0.33.0's create_draft_parallel_config on a TP4/DCP4 target leaves DCP at 1: a draft layer built
    under it believes DCP 1 in a DCP4 group and cache. The dump holds both beliefs as vLLM set them, and
    check names the mismatch for the draft only."""
    target_parallel = V.target_parallel()
    draft_parallel = V.draft_parallel(target_parallel)
    assert (draft_parallel.tensor_parallel_size, draft_parallel.decode_context_parallel_size) == (V.TP, 1)
    run_decode(V.vllm_config(target_parallel), index=3)
    draft, *_ = run_decode(V.vllm_config(draft_parallel), index=V.NUM_LAYERS, tag="draft_model")
    assert draft.impl.dcp_world_size == 1 and draft.dcp_manager is None and draft._tensortap.role == "draft"
    tensortap.close()
    rows = tensortap.open(tapped).records
    drafts, targets = rows[rows.role == "draft"], rows[rows.role == "target"]
    assert set(drafts.dcp_size) == {1} and set(drafts.group_dcp_size) == {4} and set(drafts.kv_dcp_size) == {4}
    assert set(targets.dcp_size) == {4} and "lse" not in set(drafts.point)  # DCP 1: vLLM returns no LSE
    d = tensortap.open(tapped)
    slots = sharding.filter_and_convert(V.TOPK_IDS, torch.arange(3), V.TABLE, 64, 1, 0, 1)  # replicated addressing
    assert torch.equal(d.get("slots", role="draft"), slots)
    report = tensortap.check(d)
    mismatches = [f for f in report.findings if f.code == "config-mismatch"]
    assert mismatches and {f.role for f in mismatches} == {"draft"}
    assert not state.WARNED


def test_mtp_draft_keeps_the_targets_dcp(tapped):
    """EAGLE/MTP drafts in 0.33.0 run under the target's own VllmConfig (SpecDecodeBaseProposer.
    _create_draft_vllm_config replaces only the attention, kernel and cache configs): the MTP layer believes
    DCP 4 like its group, and check finds no config mismatch."""
    layer, *_ = run_decode(V.vllm_config(V.target_parallel()), index=V.NUM_LAYERS)  # L >= num_hidden_layers
    assert layer._tensortap.role == "draft" and layer._tensortap.mtp and layer.impl.dcp_world_size == V.DCP
    tensortap.close()
    d = tensortap.open(tapped)
    assert set(d.records.role) == {"draft"} and set(d.records.dcp_size) == {4}
    assert not [f for f in tensortap.check(d).findings if f.code == "config-mismatch"]


def test_fused_all_reduce_records_post_norm_hidden(plugin_off, monkeypatch, tap_dir):
    V.install_fakes(monkeypatch, fused=True)
    monkeypatch.setenv("TAP", tap_dir)
    plugin.register()
    V.block_table()
    _, _, _, partial, normed = run_decode(V.vllm_config(V.target_parallel()))
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert d.record("hidden").meta["hidden_kind"] == "post_norm"
    assert torch.equal(d.get("hidden"), normed) and torch.equal(d.get("o_proj_partial"), partial)
    assert not state.WARNED


def test_flashinfer_sparse_backend_is_base_2(tapped):
    """FlashInfer's sparse MLA impl returns base-2 LSE (lse_base_on_e=False): its layers record lse_base=2."""
    from tensortap.integrations.vllm import layers

    assert flashinfer_mla_sparse.FlashInferMLASparseImpl.lse_base_on_e is False
    layer = V.make_layer(V.vllm_config(V.target_parallel()), 3)
    layer.impl.__class__ = type("OnFlashInfer", (flashinfer_mla_sparse.FlashInferMLASparseImpl,), {})
    layer._tensortap_meta = None
    assert layers._layer_meta(layer)["lse_base"] == "2"


def _check_codes(monkeypatch, tap_dir: str, values: str, declared: str) -> set:
    """check's finding codes for one forward whose kernel returns LSE in base `values`, its impl declaring
    base `declared` (lse_base_on_e), dumped to `tap_dir`."""
    import math

    def kernel(self, q, kv_c_and_k_pe_cache, topk_indices, kernel_metadata):
        out, lse = V.fake_flash_mla(self, q, kv_c_and_k_pe_cache, topk_indices, kernel_metadata)
        return out, lse / math.log(2) if values == "2" else lse  # [1, T, H, 512], [1, H, T]

    monkeypatch.setattr(V.flashmla_sparse.FlashMLASparseImpl, "_fp8_flash_mla_kernel", kernel)
    tensortap.configure(tap_dir)
    config = V.vllm_config(V.target_parallel())
    layer = V.make_layer(config, 3)
    layer.impl.__class__ = type("Declared", (V.flashmla_sparse.FlashMLASparseImpl,), {"lse_base_on_e": declared == "e"})
    V.decode(layer, config, V.make_metadata(get_dcp_local_seq_lens(V.SEQ_LENS, V.DCP, V.RANK, 1)), V.make_cache(),
             torch.randn(3, V.HIDDEN, generator=torch.Generator().manual_seed(3)))
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert d.record("lse").meta["lse_base"] == declared
    return {f.code for f in tensortap.check(d).findings}


def test_base_2_lse_recorded_as_base_2_checks_like_natural_log(tapped, monkeypatch, tmp_path):
    """A FlashInfer-style backend returns log2 LSE: recorded with lse_base=2, check sees exactly what it sees
    for the same forward in natural log (no lse-sanity finding); declared natural-log, it is caught. (One
    rank's dump with a one-rank combine: the zero-heads/oracle findings of rows whose tokens live on the
    other ranks are the same in all three.)"""
    natural = _check_codes(monkeypatch, str(tmp_path / "e"), "e", "e")
    base_2 = _check_codes(monkeypatch, str(tmp_path / "2"), "2", "2")
    wrong = _check_codes(monkeypatch, str(tmp_path / "wrong"), "2", "e")
    assert base_2 == natural and "lse-sanity" not in natural and "merge-mismatch" not in natural
    assert "lse-sanity" in wrong, wrong


def test_local_seq_lens_ride_on_the_builders_metadata():
    """SparseMLACommonMetadataBuilder.build, wrapped: the model runner's dcp_local_seq_lens ride on its output."""
    from types import SimpleNamespace

    from tensortap.integrations.vllm import engine

    local = torch.tensor([18, 2, 50], dtype=torch.int32)
    built = V.make_metadata()
    build = engine.wrap_metadata_build(lambda self, prefix, common, fast_build=False: built)
    assert build(None, 0, SimpleNamespace(dcp_local_seq_lens=local)) is built
    assert built._tensortap_local_seq_lens is local
    again = V.make_metadata()
    engine.wrap_metadata_build(lambda self, prefix, common: again)(None, 0, SimpleNamespace(dcp_local_seq_lens=None))
    assert not hasattr(again, "_tensortap_local_seq_lens")


def test_filter_rejects_other_layers_and_steps(tapped):
    tensortap.configure(f"{tapped};layers=78")
    run_decode(V.vllm_config(V.target_parallel()))
    assert tensortap.stats()["records"] == 0
    tensortap.configure(f"{tapped};steps=1")
    config = V.vllm_config(V.target_parallel())
    layer = V.make_layer(config, 2)  # a target layer (NUM_LAYERS = 4)
    md, cache = V.make_metadata(), V.make_cache()
    for _ in range(2):
        V.decode(layer, config, md, cache, torch.randn(3, V.HIDDEN))
    tensortap.close()
    assert set(tensortap.open(tapped).records.step) == {1}


# -- (c) kv_pages: the selection's pages under the cache's sharding, plus what the slots touched --------------------
def test_page_ids_follow_the_cache_sharding():
    table = torch.tensor([[3, 1], [2, 0]], dtype=torch.int32)  # [R, nb]
    req = torch.tensor([0, 1])  # [T]
    topk = torch.tensor([[0, 1, 5, 257], [-1, -1, -1, -1]], dtype=torch.int32)  # [T, K]
    none = torch.full((2, 4), -1, dtype=torch.int32)  # [T, K]: no slot consumed
    # DCP 4, I = 1: rank 1 owns 1, 5 (page 3 = table[0, 0]) and 257 (column 257 // 256 = 1: page 1).
    assert pages.page_ids(topk, none, table, req, 64, 8, 4, 1, 1, None).tolist() == [1, 3]
    assert pages.page_ids(topk, none, table, req, 64, 8, 4, 1, 2, None).tolist() == []  # rank 2 owns none
    touched = torch.tensor([[130, -1, -1, -1], [-1, -1, -1, -1]], dtype=torch.int32)  # slot 130: page 2
    assert pages.page_ids(topk, touched, table, req, 64, 8, 4, 1, 2, None).tolist() == [2]
    assert pages.page_ids(none, none, table, req, 64, 8, 4, 1, 0, None).numel() == 0  # all -1
    one = pages.page_ids(topk[:1, :1], none[:1, :1], table, req, 64, 8, 1, 1, 0, 32)  # T=1, DCP 1
    assert one.tolist() == [3]


# -- (d) the tap never raises into the forward -----------------------------------------------------------------------
def test_metadata_failure_does_not_reach_the_model(tapped, monkeypatch):
    config = V.vllm_config(V.target_parallel())
    layer = V.make_layer(config, 3)
    md, cache, hidden = V.make_metadata(), V.make_cache(), torch.randn(3, V.HIDDEN)
    expected, _ = V.decode(layer, config, md, cache, hidden)
    from vllm.distributed import parallel_state

    monkeypatch.setattr(parallel_state, "get_dcp_world_size_and_rank", lambda enabled=True: 1 / 0)
    layer._tensortap_meta = None  # forces the lookup again
    got, _ = V.decode(layer, config, md, cache, hidden)
    assert torch.equal(got, expected) and state.WARNED == {"_open"}


def test_broken_batch_metadata_keeps_the_forward(tapped):
    config = V.vllm_config(V.target_parallel())
    layer = V.make_layer(config, 3)
    md, cache, hidden = V.make_metadata(), V.make_cache(), torch.randn(3, V.HIDDEN)
    expected, _ = V.decode(layer, config, md, cache, hidden)
    md.num_reqs = "three"  # slicing the block table now fails inside the tap (vLLM's decode never reads it)
    got, _ = V.decode(layer, config, md, cache, hidden)
    assert torch.equal(got, expected)
    tensortap.close()
    points = list(tensortap.open(tapped).records.point)
    assert points.count("partial_out") == 2 and points.count("block_table") == 1
    assert state.WARNED == {"_tap_mqa_inputs"}
