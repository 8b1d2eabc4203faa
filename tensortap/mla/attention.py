"""Sparse absorbed-MLA decode attention on one rank: no distributed logic here.

For each token t and head h, over the K selected cache slots s_k (slot -1 is skipped):

    score_k = scale * q[t, h, :576] . kv[s_k, :576]
    lse     = log(sum_k exp(score_k))                   (natural log)
    out     = sum_k softmax(score)_k * kv[s_k, :512]    (values are the 512-wide latent)

A query row with no valid slot is "lonely": the kernel returns out = 0 and lse = +inf.
Under DCP such rows are rewritten to (0, -inf) before the merge so that they contribute
nothing (`neutralise_lonely_rows`).
"""

from __future__ import annotations

import torch

from tensortap.mla.config import KV_LORA_RANK
from tensortap.mla.kvcache import KVCache


def attend(q: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor, softmax_scale: float):
    """q [T, H, 576], kv [T, K, 576], valid [T, K] -> out [T, H, 512], lse [T, H] (float32 math)."""
    qf, kvf = q.float(), kv.float()
    scores = torch.einsum("thd,tkd->thk", qf, kvf) * softmax_scale  # [T, H, K]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))  # [T, H, K]
    lse = torch.logsumexp(scores, dim=-1)  # [T, H]; -inf for a lonely row
    lonely = ~valid.any(dim=-1)  # [T]
    probs = torch.exp(scores - lse.masked_fill(lonely[:, None], 0.0)[..., None])  # [T, H, K]
    out = torch.einsum("thk,tkd->thd", probs, kvf[..., :KV_LORA_RANK])  # [T, H, 512]
    out = out.masked_fill(lonely[:, None, None], 0.0)  # [T, H, 512]
    lse = lse.masked_fill(lonely[:, None], float("inf"))  # [T, H]: the kernel's lonely-q signal
    return out, lse


def sparse_mla_decode(q: torch.Tensor, cache: KVCache, slots: torch.Tensor, softmax_scale: float):
    """Gather the selected slots from the fp8_ds_mla cache and attend: (out [T, H, 512] in q's dtype, lse [T, H] fp32)."""
    kv = cache.gather(slots)  # [T, K, 576], dequantised
    out, lse = attend(q, kv, slots >= 0, softmax_scale)
    return out.to(q.dtype), lse


def neutralise_lonely_rows(out: torch.Tensor, lse: torch.Tensor, slots: torch.Tensor):
    """DCP path: rows with no local slot become (0, -inf), so the owning ranks supply those heads."""
    lonely = (slots < 0).all(dim=-1)  # [T]
    return out.masked_fill(lonely[:, None, None], 0.0), lse.masked_fill(lonely[:, None], float("-inf"))
