"""Model sizes and parallel configs of the reference, and the draft-config bug.

`create_draft_parallel_config` mirrors vLLM 0.33.0's `SpeculativeConfig.create_draft_parallel_config`:
it builds the draft's ParallelConfig from a handful of the target's fields and does not copy
`decode_context_parallel_size`, so the draft's DCP silently becomes 1 (`fixed=True` copies
the DCP fields, as the fix does).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

KV_LORA_RANK = 512  # fp8_ds_mla fixes the latent at 512 and the rope part at 64
ROPE_DIM = 64


@dataclass(frozen=True)
class MLAConfig:
    """Sizes of one absorbed-MLA attention layer with a DSA-style sparse indexer."""

    name: str
    num_heads: int  # model total, before tensor parallelism
    hidden_size: int
    qk_nope_dim: int
    v_head_dim: int
    index_topk: int
    index_heads: int
    index_dim: int
    block_size: int
    kv_lora_rank: int = KV_LORA_RANK
    rope_dim: int = ROPE_DIM

    @property
    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5, as vLLM passes it to the 576-wide absorbed kernel (no yarn mscale here)."""
        return (self.qk_nope_dim + self.rope_dim) ** -0.5

    @property
    def q_dim(self) -> int:
        return self.kv_lora_rank + self.rope_dim  # 576: absorbed latent query + rope


PRESETS = {
    # Small enough for float64 oracles in tests; fp8_ds_mla still fixes 512 + 64.
    "tiny": MLAConfig(name="tiny", num_heads=8, hidden_size=64, qk_nope_dim=32, v_head_dim=32,
                      index_topk=24, index_heads=2, index_dim=16, block_size=4),
    # The tiny sizes with vLLM's usual block size of 64: room for interleaves up to 64.
    "tiny-bs64": MLAConfig(name="tiny-bs64", num_heads=8, hidden_size=64, qk_nope_dim=32, v_head_dim=32,
                           index_topk=24, index_heads=2, index_dim=16, block_size=64),
    # GLM-5.x (glm_moe_dsa) attention: 64 heads, kv_lora 512, qk_nope 192, rope 64, v 256, top-k 2048.
    "glm5": MLAConfig(name="glm5", num_heads=64, hidden_size=6144, qk_nope_dim=192, v_head_dim=256,
                      index_topk=2048, index_heads=32, index_dim=128, block_size=64),
}


@dataclass(frozen=True)
class ParallelConfig:
    """The fields of vLLM's ParallelConfig that decide DCP attention."""

    tensor_parallel_size: int = 1
    decode_context_parallel_size: int = 1
    cp_kv_cache_interleave_size: int = 1
    dcp_comm_backend: str = "ag_rs"  # or "a2a"

    def __post_init__(self):
        tp, dcp = self.tensor_parallel_size, self.decode_context_parallel_size
        if tp % dcp:
            raise ValueError(f"tensor_parallel_size {tp} must be a multiple of decode_context_parallel_size {dcp}")
        if self.dcp_comm_backend not in ("ag_rs", "a2a"):
            raise ValueError(f"dcp_comm_backend must be 'ag_rs' or 'a2a', not {self.dcp_comm_backend!r}")


def create_draft_parallel_config(target: ParallelConfig, draft_tensor_parallel_size: int,
                                 fixed: bool = False) -> ParallelConfig:
    """The draft model's parallel config, built like vLLM 0.33.0 builds it.

    vLLM copies only the executor fields, sets pp=1 and tp=draft tp; DCP keeps its default of 1.
    With `fixed=True` the DCP fields are copied too (the fix).
    """
    draft = ParallelConfig(tensor_parallel_size=draft_tensor_parallel_size)
    if fixed:
        draft = dataclasses.replace(
            draft,
            decode_context_parallel_size=target.decode_context_parallel_size,
            cp_kv_cache_interleave_size=target.cp_kv_cache_interleave_size,
            dcp_comm_backend=target.dcp_comm_backend,
        )
    return draft
