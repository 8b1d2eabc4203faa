"""One absorbed-MLA decode layer with a sparse indexer under TP and DCP, tapped at every point.

The attention impl decides DCP from its parallel config (`dcp_size`); the attention metadata
(block table, slot mapping, local lengths, the rank the index filter uses) and the index
cache come from the process group, as in vLLM. When the two agree (target; draft with the
fix) the layer is correct. When the draft's config says DCP 1 against a DCP-sharded cache,
the symptom of the facts file follows from these code paths alone: no query all-gather, no
merge, and on DCP ranks 1..N-1 every index row is filtered to -1, so their heads are zero.

Simplifications (they do not touch sharding or merging): no RoPE rotation (q_pe/k_pe come
from projections), no q LoRA, RMSNorm without a learned weight, float32 math on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

import tensortap
from tensortap.mla import sharding
from tensortap.mla.attention import neutralise_lonely_rows, sparse_mla_decode
from tensortap.mla.config import MLAConfig, ParallelConfig
from tensortap.mla.dcp import all_gather_heads, combine, mask_empty_shards
from tensortap.mla.indexer import select_topk
from tensortap.mla.kvcache import KVCache, PagedBuffer, pack


@dataclass
class ProcessGroups:
    """The process groups as torch.distributed set them up: TP = world; DCP = contiguous blocks of TP."""

    tp_group: object
    tp_rank: int
    tp_size: int
    dcp_group: object
    dcp_rank: int
    dcp_size: int

    @classmethod
    def build(cls, dcp_size: int) -> "ProcessGroups":
        if not dist.is_initialized():
            return cls(None, 0, 1, None, 0, 1)
        rank, world = dist.get_rank(), dist.get_world_size()
        if world % dcp_size:
            raise ValueError(f"world size {world} is not a multiple of the DCP size {dcp_size}")
        dcp_group = None
        for start in range(0, world, dcp_size):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(start, start + dcp_size)))
            if start <= rank < start + dcp_size:
                dcp_group = group
        return cls(dist.group.WORLD, rank, world, dcp_group, rank % dcp_size, dcp_size)


@dataclass
class DecodeMetadata:
    """Attention metadata of one decode forward (one token per request), built from the process group."""

    positions: torch.Tensor  # [T]
    req_ids: torch.Tensor  # [T]
    seq_lens: torch.Tensor  # [R], including the new token
    block_table: torch.Tensor  # [R, nb] int32
    slot_mapping: torch.Tensor  # [T], -1 where another rank owns the token
    local_seq_lens: torch.Tensor  # [R]
    seq_lens_cpu: list[int] | None  # host copies: the tap's metadata costs no device sync (None: device-built)
    local_seq_lens_cpu: list[int] | None
    dcp_size: int
    dcp_rank: int
    interleave: int
    block_size: int
    index_width: int | None = None  # static shapes (CUDA graphs): fixed indexer width, no host syncs

    @property
    def static(self) -> bool:
        return self.index_width is not None

    @classmethod
    def build(cls, positions: torch.Tensor, block_table: torch.Tensor, block_size: int, dcp_size: int,
              dcp_rank: int, interleave: int) -> "DecodeMetadata":
        """From host positions [T] (one decode token per request); device tensors on the block table's device."""
        device = block_table.device
        seq_lens_cpu = positions.cpu() + 1  # [R]
        local_cpu = sharding.local_seq_lens(seq_lens_cpu, dcp_size, dcp_rank, interleave)  # [R]
        positions = positions.to(device)
        req_ids = torch.arange(positions.shape[0], device=device)  # [T]
        slots = sharding.slot_mapping(positions, req_ids, block_table, block_size, dcp_size, dcp_rank, interleave)
        return cls(positions, req_ids, seq_lens_cpu.to(device), block_table, slots, local_cpu.to(device),
                   seq_lens_cpu.tolist(), local_cpu.tolist(), dcp_size, dcp_rank, interleave, block_size)

    @classmethod
    def build_on_device(cls, positions: torch.Tensor, block_table: torch.Tensor, block_size: int, dcp_size: int,
                        dcp_rank: int, interleave: int, index_width: int) -> "DecodeMetadata":
        """The same metadata from device positions [T], with no host copy (inside a CUDA-graph capture)."""
        seq_lens = positions + 1  # [R]
        local = sharding.local_seq_lens(seq_lens, dcp_size, dcp_rank, interleave)  # [R]
        req_ids = torch.arange(positions.shape[0], device=positions.device)  # [T]
        slots = sharding.slot_mapping(positions, req_ids, block_table, block_size, dcp_size, dcp_rank, interleave)
        return cls(positions, req_ids, seq_lens, block_table, slots, local, None, None, dcp_size, dcp_rank,
                   interleave, block_size, index_width)


@dataclass
class LayerWeights:
    """This TP rank's slice of one layer's weights (heads [first, first + H_tp)) and the replicated ones."""

    w_q: torch.Tensor  # [C, H_tp, nope + rope]
    w_uk: torch.Tensor  # [H_tp, nope, 512]
    w_uv: torch.Tensor  # [H_tp, 512, v]
    w_o: torch.Tensor  # [H_tp, v, C]: the row-parallel o_proj slice
    w_kv: torch.Tensor  # [C, 576]
    w_idx_q: torch.Tensor  # [C, nh, d]
    w_idx_w: torch.Tensor  # [C, nh]
    w_idx_k: torch.Tensor  # [C, d]


def _randn(seed: int, *shape: int, scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * scale  # float32 on the CPU: the same bits everywhere


def make_weights(cfg: MLAConfig, seed: int, layer: int, heads: range, dtype=torch.float32, device="cpu") -> LayerWeights:
    """Deterministic weights, generated head by head so that any TP layout slices the same model."""
    c, nope, v, lat = cfg.hidden_size, cfg.qk_nope_dim, cfg.v_head_dim, cfg.kv_lora_rank
    base = seed * 1_000_003 + layer * 10_007

    def per_head(salt: int, *shape: int, scale: float) -> torch.Tensor:
        return torch.stack([_randn(base + 97 * h + salt, *shape, scale=scale) for h in heads])

    w = LayerWeights(
        w_q=per_head(1, c, nope + cfg.rope_dim, scale=c**-0.5).permute(1, 0, 2),  # [C, H_tp, nope + rope]
        w_uk=per_head(2, nope, lat, scale=nope**-0.5),  # [H_tp, nope, 512]
        w_uv=per_head(3, lat, v, scale=lat**-0.5),  # [H_tp, 512, v]
        w_o=per_head(4, v, c, scale=(cfg.num_heads * v) ** -0.5),  # [H_tp, v, C]
        w_kv=_randn(base - 1, c, lat + cfg.rope_dim, scale=c**-0.5),  # [C, 576]
        w_idx_q=_randn(base - 2, c, cfg.index_heads, cfg.index_dim, scale=c**-0.5),  # [C, nh, d]
        w_idx_w=_randn(base - 3, c, cfg.index_heads, scale=c**-0.5),  # [C, nh]
        w_idx_k=_randn(base - 4, c, cfg.index_dim, scale=c**-0.5),  # [C, d]
    )
    return LayerWeights(**{k: t.to(device=device, dtype=dtype).contiguous() for k, t in vars(w).items()})


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)  # [..., C]


def kv_projection(hidden: torch.Tensor, w: LayerWeights, cfg: MLAConfig):
    """The new token's cache entries: latent [T, 512] (RMS-normed), rope [T, 64], index key [T, d]."""
    kv = hidden @ w.w_kv  # [T, 576]
    latent = rms_norm(kv[:, : cfg.kv_lora_rank])  # [T, 512]
    return latent, kv[:, cfg.kv_lora_rank:], hidden @ w.w_idx_k  # [T, 512], [T, 64], [T, d]


def absorbed_query(hidden: torch.Tensor, w: LayerWeights, cfg: MLAConfig) -> torch.Tensor:
    """q [T, H_tp, 576] = [q_nope @ W_UK (512) | q_pe (64)] for this rank's heads."""
    q = torch.einsum("tc,chd->thd", hidden, w.w_q)  # [T, H_tp, nope + rope]
    q_nope, q_pe = q[..., : cfg.qk_nope_dim], q[..., cfg.qk_nope_dim:]  # [T, H_tp, nope], [T, H_tp, 64]
    q_latent = torch.einsum("thn,hnl->thl", q_nope, w.w_uk)  # [T, H_tp, 512]
    return torch.cat([q_latent, q_pe], dim=-1)  # [T, H_tp, 576]


class MLALayer:
    """One decode attention layer on one TP rank.

    `kv_pages` taps the pages this rank should have read: those the selected tokens map to under
    the cache's sharding (the process group's DCP, as the cache writer used it), plus any page the
    consumed slots touched. Enough for an oracle to recompute the right answer even when the layer
    addresses the cache wrongly, and no more (computed only when kv_pages is wanted)."""

    def __init__(self, cfg: MLAConfig, layer: int, role: str, parallel: ParallelConfig, groups: ProcessGroups,
                 num_blocks: int, seed: int = 0, dtype=torch.float32, device="cpu"):
        self.cfg, self.layer, self.role, self.groups = cfg, layer, role, groups
        self.heads = cfg.num_heads // groups.tp_size  # H_tp
        self.first_head = groups.tp_rank * self.heads
        # What the impl believes, from its own parallel config (vLLM: get_dcp_world_size_and_rank(dcp > 1)).
        self.dcp_size = parallel.decode_context_parallel_size
        self.dcp_rank = groups.dcp_rank if self.dcp_size > 1 else 0
        self.backend = parallel.dcp_comm_backend
        self.weights = make_weights(cfg, seed, layer, range(self.first_head, self.first_head + self.heads), dtype, device)
        self.cache = KVCache(num_blocks, cfg.block_size, device)
        self.index_cache = PagedBuffer(num_blocks, cfg.block_size, cfg.index_dim, torch.float32, device)

    # -- cache writes (prefill and decode) --------------------------------------------------------------
    def write_cache(self, slots: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor, index_key: torch.Tensor,
                    static: bool = False):
        """Write tokens at their slots on this rank (slot -1: another rank's token, skipped); `static`
        writes without a host sync (CUDA graphs), with the same result."""
        if not static:
            self.cache.write_tokens(slots, latent, rope)
            self.index_cache.write(slots, index_key)
            return
        write_rows(self.cache, slots, pack(latent, rope))
        write_rows(self.index_cache, slots, index_key)

    # -- the decode forward -------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, meta: DecodeMetadata, trace: dict | None = None) -> torch.Tensor:
        """hidden [T, C] (identical on every TP rank) -> hidden [T, C] after the o_proj all-reduce.

        `trace`, when given, receives the top-k ids and this rank's merged output (for tests)."""
        with tensortap.scope(layer=self.layer, role=self.role, **self._tap_meta(meta)):
            self.write_cache(meta.slot_mapping, *kv_projection(hidden, self.weights, self.cfg), static=meta.static)
            topk = select_topk(hidden, self.weights.w_idx_q, self.weights.w_idx_w, self.index_cache, meta.req_ids,
                               meta.seq_lens[meta.req_ids], meta.block_table, self.cfg.index_topk,
                               self.groups.dcp_group, meta.dcp_size, meta.dcp_rank, meta.interleave,
                               meta.index_width)  # [T, K]
            merged = self._attention(hidden, topk, meta)  # [T, H_tp, 512]
            if trace is not None:
                trace.update(topk=topk.cpu(), merged=merged.cpu())
            return self._output(merged)  # [T, C]

    def _attention(self, hidden: torch.Tensor, topk: torch.Tensor, meta: DecodeMetadata) -> torch.Tensor:
        name = f"layers.{self.layer}.attn."
        tensortap.point(name + "block_table", meta.block_table)
        q = absorbed_query(hidden, self.weights, self.cfg)  # [T, H_tp, 576]
        q_offset = self.first_head
        if self.dcp_size > 1:
            q = all_gather_heads(q, self.groups.dcp_group, self.dcp_size)  # [T, N*H_tp, 576]
            q_offset = (self.groups.tp_rank // self.dcp_size) * self.dcp_size * self.heads  # the group's first head
        tensortap.point(name + "q", q, head_offset=q_offset)
        # The filter takes its DCP size from the impl and its rank from the metadata (the process group).
        slots = sharding.filter_and_convert(topk, meta.req_ids, meta.block_table, meta.block_size,
                                            self.dcp_size, meta.dcp_rank, meta.interleave)  # [T, K]
        tensortap.point(name + "topk", topk)
        tensortap.point(name + "slots", slots)
        if tensortap.wants(name + "kv_pages"):
            # every page of the batch's requests: a superset of those read, found with no host sync (the
            # exact set needs unique(), which sizes its output on the host), the same eager and in graphs
            pages = meta.block_table[meta.req_ids].reshape(-1)  # [T * blocks per request]
            tensortap.point(name + "kv_pages", self.cache.pages(pages), page_ids=pages)
        out, lse = sparse_mla_decode(q, self.cache, slots, self.cfg.softmax_scale)  # [T, Hq, 512], [T, Hq]
        if self.dcp_size > 1:
            out, lse = neutralise_lonely_rows(out, lse, slots)
            lse = mask_empty_shards(lse, meta.local_seq_lens[meta.req_ids])  # [T, Hq]
        tensortap.point(name + "partial_out", out, head_offset=q_offset)
        tensortap.point(name + "lse", lse, head_offset=q_offset)
        merged = out
        if self.dcp_size > 1:
            merged = combine(out, lse, self.groups.dcp_group, self.dcp_size, self.dcp_rank, self.backend)
        tensortap.point(name + "merged_out", merged, head_offset=self.first_head)
        return merged

    def _output(self, merged: torch.Tensor) -> torch.Tensor:
        name = f"layers.{self.layer}.attn."
        tokens = merged.shape[0]
        attn_out = torch.einsum("thl,hlv->thv", merged.to(self.weights.w_uv.dtype), self.weights.w_uv)  # [T, H_tp, v]
        attn_out = attn_out.reshape(tokens, -1)  # [T, H_tp*v], head-major: the row-parallel o_proj input
        tensortap.point(name + "attn_out", attn_out, head_offset=self.first_head)
        partial = attn_out @ self.weights.w_o.reshape(-1, self.cfg.hidden_size)  # [T, C]
        tensortap.point(name + "o_proj_partial", partial)
        hidden = partial.clone()  # [T, C]
        if self.groups.tp_size > 1:
            dist.all_reduce(hidden, group=self.groups.tp_group)  # [T, C]: identical on every TP rank
        tensortap.point(name + "hidden", hidden)
        return hidden

    def _tap_meta(self, meta: DecodeMetadata) -> dict:
        if not tensortap.enabled():
            return {}
        cfg, g = self.cfg, self.groups
        return dict(
            tp_rank=g.tp_rank, tp_size=g.tp_size, dcp_rank=self.dcp_rank, dcp_size=self.dcp_size,
            group_dcp_rank=meta.dcp_rank, group_dcp_size=meta.dcp_size, kv_dcp_size=meta.dcp_size,
            interleave=meta.interleave, num_heads=cfg.num_heads,
            seq_lens=meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens,  # device: a graph slot
            local_seq_lens=meta.local_seq_lens_cpu if meta.local_seq_lens_cpu is not None else meta.local_seq_lens,
            req_ids=list(range(meta.positions.shape[0])),
            kv_format="fp8_ds_mla", block_size=cfg.block_size,
            softmax_scale=cfg.softmax_scale, kv_lora_rank=cfg.kv_lora_rank, rope_dim=cfg.rope_dim,
            dcp_comm_backend=self.backend, lse_base="e", hidden_kind="sum",
        )


def write_rows(buffer: PagedBuffer, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """buffer.write(slots [T], rows [T, W]) without a host sync: a token with slot -1 rewrites the first
    kept token's row with that same row (or, if none is kept, row 0 with itself), so duplicate indices
    always carry equal values and the result is exactly that of the masked write."""
    if slots.numel() == 0:
        return
    flat = buffer.data.view(-1, buffer.data.shape[-1])  # [S, W]
    keep = slots >= 0  # [T]
    first = torch.argmax(keep.to(torch.int32)).view(1)  # [1]: the first kept token (0 if none)
    any_kept = keep.any()  # []
    rows = rows.to(flat.dtype)  # [T, W]
    target = torch.where(keep, slots.long(), torch.where(any_kept, slots.index_select(0, first).long(), 0))  # [T]
    fallback = torch.where(any_kept, rows.index_select(0, first), flat[:1])  # [1, W]
    flat.index_put_((target,), torch.where(keep[:, None], rows, fallback))  # [T, W] written

