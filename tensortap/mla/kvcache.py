"""The `fp8_ds_mla` paged KV cache: 656 bytes a token.

    bytes [  0, 512)  512 x float8_e4m3fn   the NoPE latent, in four tiles of 128
    bytes [512, 528)    4 x float32         one scale per tile (the scale, not its inverse)
    bytes [528, 656)   64 x bfloat16        the RoPE part, not quantised

Quantisation (vLLM 0.33.0's cache writers, FlashMLA's reference):
    scale_t = 2^ceil(log2(max(amax_t / 448, 1e-4)))     a power of two >= amax_t / 448
    q       = round_to_nearest_even(x / scale_t) as e4m3 (|x / scale_t| <= 448: never saturates)
Dequantisation: x' = float(q) * scale_t, exact in float32 (and in bfloat16).
"""

from __future__ import annotations

import torch

from tensortap.mla.config import KV_LORA_RANK, ROPE_DIM

TOKEN_BYTES = 656
TILE = 128
NUM_TILES = KV_LORA_RANK // TILE  # 4
SCALE_OFFSET = KV_LORA_RANK  # 512
ROPE_OFFSET = SCALE_OFFSET + 4 * NUM_TILES  # 528
FP8_MAX = 448.0
MIN_SCALE = 1e-4


def tile_scales(kv_c: torch.Tensor) -> torch.Tensor:
    """[T, 512] -> [T, 4] power-of-two scales: 2^ceil(log2(max(amax / 448, 1e-4)))."""
    tiles = kv_c.float().view(-1, NUM_TILES, TILE)  # [T, 4, 128]
    amax = tiles.abs().amax(dim=-1)  # [T, 4]
    return torch.exp2(torch.ceil(torch.log2(torch.clamp(amax / FP8_MAX, min=MIN_SCALE))))  # [T, 4]


def pack(kv_c: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """Latent [T, 512] (float) and rope [T, 64] -> cache rows [T, 656] uint8."""
    tokens = kv_c.shape[0]
    scales = tile_scales(kv_c)  # [T, 4]
    tiles = kv_c.float().view(tokens, NUM_TILES, TILE) / scales[..., None]  # [T, 4, 128], |.| <= 448
    fp8 = tiles.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(tokens, KV_LORA_RANK)  # [T, 512]
    rope = k_pe.to(torch.bfloat16).view(tokens, ROPE_DIM)  # [T, 64]
    return torch.cat(
        [fp8.view(torch.uint8), scales.contiguous().view(torch.uint8), rope.contiguous().view(torch.uint8)], dim=-1
    )  # [T, 656]


def unpack(rows: torch.Tensor) -> torch.Tensor:
    """Cache rows [..., 656] uint8 -> dequantised [..., 576] float32: latent (512) then rope (64)."""
    lead = rows.shape[:-1]
    flat = rows.reshape(-1, TOKEN_BYTES)  # [N, 656]
    fp8 = flat[:, :SCALE_OFFSET].contiguous().view(torch.float8_e4m3fn).float()  # [N, 512]
    scales = flat[:, SCALE_OFFSET:ROPE_OFFSET].contiguous().view(torch.float32)  # [N, 4]
    latent = (fp8.view(-1, NUM_TILES, TILE) * scales[..., None]).view(-1, KV_LORA_RANK)  # [N, 512]
    rope = flat[:, ROPE_OFFSET:].contiguous().view(torch.bfloat16).float()  # [N, 64]
    return torch.cat([latent, rope], dim=-1).view(*lead, KV_LORA_RANK + ROPE_DIM)  # [..., 576]


class PagedBuffer:
    """A paged per-token buffer [num_blocks, block_size, width]; slot s is row s of the flattened view."""

    def __init__(self, num_blocks: int, block_size: int, width: int, dtype: torch.dtype, device="cpu"):
        self.block_size = block_size
        self.data = torch.zeros(num_blocks, block_size, width, dtype=dtype, device=device)  # [blocks, bs, width]

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Write rows [T, width] at slots [T]; slot -1 (another rank's token) is skipped."""
        keep = slots >= 0  # [T]
        self.data.view(-1, self.data.shape[-1])[slots[keep].long()] = rows[keep].to(self.data.dtype)  # [kept, width]

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """Rows at slots [...] -> [..., width]; slot -1 reads zeros."""
        flat = self.data.view(-1, self.data.shape[-1])  # [num_blocks * bs, width]
        rows = flat[slots.clamp(min=0).long()]  # [..., width]
        return torch.where((slots >= 0)[..., None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))  # [..., width]

    def pages(self, page_ids: torch.Tensor) -> torch.Tensor:
        return self.data[page_ids.long()].clone()  # [P, bs, width]


class KVCache(PagedBuffer):
    """The fp8_ds_mla cache of one attention layer on one rank."""

    def __init__(self, num_blocks: int, block_size: int, device="cpu"):
        super().__init__(num_blocks, block_size, TOKEN_BYTES, torch.uint8, device)

    def write_tokens(self, slots: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor) -> None:
        self.write(slots, pack(kv_c, k_pe))

    def gather(self, slots: torch.Tensor) -> torch.Tensor:
        """Dequantised keys/values at slots [T, K] -> [T, K, 576] (zeros at -1)."""
        return unpack(self.read(slots))
