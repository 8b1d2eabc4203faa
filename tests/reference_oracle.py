"""A float64 single-device oracle for the reference decode: replay every forward of a trace densely.

No sharding, no collectives: one logical KV store per layer indexed by (request, position),
all heads at once, the selected tokens gathered by their global ids. Cache contents go
through the fp8_ds_mla round trip (what the cache really holds) and the new token's latent
is projected in float32 exactly as the model does; everything after that is float64.
"""

from __future__ import annotations

import torch

from tensortap.mla.kvcache import pack, unpack
from tensortap.mla.model import kv_projection, make_weights
from tensortap.mla.scenario import Scenario, prompt_entries


def replay(scn: Scenario, trace: list[dict]) -> list[dict]:
    """Expected merged output [T, H, 512] and hidden [T, C] (float64) of each forward in `trace`."""
    cfg = scn.cfg
    heads = range(cfg.num_heads)
    layers = {"target": scn.target_layer, "draft": scn.draft_layer}
    w32 = {role: make_weights(cfg, scn.seed, layer, heads, torch.float32) for role, layer in layers.items()}
    w64 = {role: make_weights(cfg, scn.seed, layer, heads, torch.float64) for role, layer in layers.items()}
    store = {role: _prompt_store(scn, layer) for role, layer in layers.items()}
    expected = []
    for fwd in trace:
        role = fwd["role"]
        kv = store[role]  # [R, max_len, 576]
        latent, rope, _ = kv_projection(fwd["hidden_in"].float(), w32[role], cfg)  # float32, as the model
        kv[torch.arange(kv.shape[0]), fwd["positions"]] = unpack(pack(latent, rope)).double()
        expected.append(_attend_all_heads(fwd["hidden_in"].double(), fwd["topk"].long(), kv, w64[role], cfg))
    return expected


def _prompt_store(scn: Scenario, layer: int) -> torch.Tensor:
    kv = torch.zeros(len(scn.prompts), scn.max_len, scn.cfg.q_dim, dtype=torch.float64)  # [R, L, 576]
    for request, length in enumerate(scn.prompts):
        latent, rope, _ = prompt_entries(scn.cfg, scn.seed, layer, request, length)
        kv[request, :length] = unpack(pack(latent, rope)).double()
    return kv


def _attend_all_heads(hidden: torch.Tensor, topk: torch.Tensor, kv: torch.Tensor, w, cfg) -> dict:
    q = torch.einsum("tc,chd->thd", hidden, w.w_q)  # [T, H, nope + rope]
    q_latent = torch.einsum("thn,hnl->thl", q[..., : cfg.qk_nope_dim], w.w_uk)  # [T, H, 512]
    q = torch.cat([q_latent, q[..., cfg.qk_nope_dim:]], dim=-1)  # [T, H, 576]
    valid = topk >= 0  # [T, K]
    selected = kv[torch.arange(topk.shape[0])[:, None], topk.clamp(min=0)]  # [T, K, 576]
    scores = torch.einsum("thd,tkd->thk", q, selected) * cfg.softmax_scale  # [T, H, K]
    probs = torch.softmax(scores.masked_fill(~valid[:, None, :], float("-inf")), dim=-1)  # [T, H, K]
    merged = torch.einsum("thk,tkd->thd", probs, selected[..., : cfg.kv_lora_rank])  # [T, H, 512]
    attn = torch.einsum("thl,hlv->thv", merged, w.w_uv).reshape(hidden.shape[0], -1)  # [T, H*v]
    return {"merged": merged, "hidden": attn @ w.w_o.reshape(-1, cfg.hidden_size)}  # [T, C]
