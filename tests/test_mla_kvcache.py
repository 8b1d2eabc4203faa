"""The fp8_ds_mla format: byte layout, power-of-two scales, the dequantisation error bound."""

import torch

from tensortap.mla import kvcache


def test_byte_layout():
    latent = torch.zeros(1, 512)
    latent[0, :128] = 1.0  # tile 0: amax 1 -> scale 2^ceil(log2(1/448)) = 2^-8
    latent[0, 128:256] = torch.linspace(-448.0, 448.0, 128)  # tile 1: amax 448 -> scale 1
    latent[0, 300] = 3.0  # tile 2: amax 3 -> 2^ceil(log2(3/448)) = 2^-7
    rope = torch.arange(64, dtype=torch.float32).view(1, 64) / 8
    row = kvcache.pack(latent, rope)
    assert row.shape == (1, 656) and row.dtype == torch.uint8
    scales = row[0, 512:528].view(torch.float32).tolist()
    assert scales == [2.0**-8, 1.0, 2.0**-7, 2.0**-13], "tile 3 is all zero: the 1e-4 floor rounds up to 2^-13"
    assert torch.equal(row[0, 528:656].view(torch.bfloat16), rope[0].bfloat16())
    fp8 = row[0, :512].view(torch.float8_e4m3fn).float()
    assert torch.equal(fp8[:128], torch.full((128,), 256.0)), "1.0 / 2^-8 = 256, exact in e4m3"
    assert fp8[300] == 3.0 * 2**7


def test_roundtrip_exact_for_representable_values():
    latent = torch.zeros(2, 512)
    latent[:, ::7] = torch.tensor([1.0, -0.5])[:, None]
    rope = torch.randn(2, 64).bfloat16().float()
    back = kvcache.unpack(kvcache.pack(latent, rope))
    assert torch.equal(back[:, :512], latent) and torch.equal(back[:, 512:], rope)


def test_dequantisation_error_bound():
    torch.manual_seed(0)
    latent = torch.randn(256, 512) * torch.logspace(-3, 2, 256)[:, None]
    back = kvcache.unpack(kvcache.pack(latent, torch.zeros(256, 64)))[:, :512]
    scales = kvcache.tile_scales(latent).repeat_interleave(128, dim=1)  # [T, 512]
    # e4m3 keeps 3 mantissa bits: |x - x'| <= |x| * 2^-4 (normal), <= scale * 2^-10 (subnormal)
    bound = torch.maximum(latent.abs() * 2.0**-4, scales * 2.0**-10)
    assert ((back - latent).abs() <= bound).all()
    assert (latent.view(256, 4, 128).abs().amax(-1) / kvcache.tile_scales(latent) <= 448).all()


def test_paged_buffer_skips_minus_one():
    buf = kvcache.PagedBuffer(num_blocks=3, block_size=2, width=4, dtype=torch.float32)
    buf.write(torch.tensor([5, -1, 0]), torch.arange(12, dtype=torch.float32).view(3, 4))
    assert buf.read(torch.tensor([[5, 0, -1]])).tolist() == [[[0, 1, 2, 3], [8, 9, 10, 11], [0, 0, 0, 0]]]
    assert buf.pages(torch.tensor([2]))[0, 1].tolist() == [0, 1, 2, 3]
