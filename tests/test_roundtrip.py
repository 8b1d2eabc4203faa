"""Every dtype round-trips bit-exact through capture, the file and the reader, NaN/Inf payloads included."""

import numpy as np
import pytest
import torch

import tensortap
from tensortap.format import codecs

BIT_VIEW = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float8_e4m3fn: torch.uint8,
    torch.float8_e5m2: torch.uint8,
}


def every_code(dtype):
    """All bit patterns of a 8/16-bit float type, NaN payloads, infinities and subnormals included."""
    view = BIT_VIEW[dtype]
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).reshape(4, 64)
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)


def special_float32():
    bits = torch.tensor([0x7FC00001, 0x7F800001, 0xFFC12345, 0x7F800000, 0xFF800000, 0x00000001, 0x80000000, 0x3F800000],
                        dtype=torch.int64).to(torch.int32)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (64,), dtype=torch.int64).to(torch.int32)
    return torch.cat([bits, random_bits]).view(torch.float32).reshape(8, 9)


def cases():
    torch.manual_seed(0)
    return {
        "bfloat16": every_code(torch.bfloat16),
        "float16": every_code(torch.float16),
        "float8_e4m3fn": every_code(torch.float8_e4m3fn),
        "float8_e5m2": every_code(torch.float8_e5m2),
        "float32": special_float32(),
        "float64": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 5e-324, 1.0], dtype=torch.float64),
        "int32": torch.tensor([[-1, 0, 2**31 - 1, -(2**31)]], dtype=torch.int32),
        "int64": torch.tensor([-1, 2**63 - 1, -(2**63)], dtype=torch.int64),
        "int8": torch.tensor([-128, 127, 0], dtype=torch.int8),
        "uint8": torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16),
        "bool": torch.tensor([[True, False, True]]),
        "empty": torch.zeros(0, 7, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.5, dtype=torch.float32),
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in BIT_VIEW:
        return torch.equal(a.view(BIT_VIEW[a.dtype]), b.view(BIT_VIEW[b.dtype]))
    return torch.equal(a, b)


def test_every_dtype_roundtrips_bit_exact(tap_dir):
    tensors = cases()
    tensortap.configure(dir=tap_dir)
    for i, (label, t) in enumerate(tensors.items()):
        tensortap.point(f"layers.{i}.attn.q", t, step=0, role="target")
    tensortap.close()
    d = tensortap.open(tap_dir)
    assert len(d) == len(tensors)
    for i, (label, t) in enumerate(tensors.items()):
        back = d.get("q", layer=i)
        assert same_bits(back, t), label


def test_float_decoding_is_exact_for_every_code():
    """The numpy-only decoders (used by the analyzer) agree with torch's own upcast on every code."""
    for dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.float16):
        t = every_code(dtype)
        stored, name = codecs.encode(t.contiguous())
        ours = codecs.to_float(stored, name)
        theirs = t.double().numpy()
        nan = np.isnan(theirs)
        assert np.array_equal(np.isnan(ours), nan), name
        assert np.array_equal(ours[~nan], theirs[~nan]), name


def test_recorded_value_is_a_snapshot(tap_dir):
    """Writing into the tensor after point() must not change what was recorded."""
    tensortap.configure(dir=tap_dir)
    t = torch.ones(4, 8, 16)
    tensortap.point("layers.0.attn.q", t, step=0)
    t.zero_()
    tensortap.close()
    assert torch.equal(tensortap.open(tap_dir).get("q"), torch.ones(4, 8, 16))


def test_compressed_roundtrip(tap_dir):
    tensortap.configure(dir=tap_dir, compress="gzip")
    t = torch.randn(4, 8, 16).bfloat16()
    tensortap.point("layers.0.attn.q", t, step=0)
    tensortap.close()
    assert same_bits(tensortap.open(tap_dir).get("q"), t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_record_numpy_views(tap_dir, dtype):
    tensortap.configure(dir=tap_dir)
    t = torch.randn(3, 5).to(dtype)
    tensortap.point("layers.0.attn.lse", t, step=0)
    tensortap.close()
    rec = tensortap.open(tap_dir)[0]
    assert rec.numpy().dtype == np.float32
    assert np.array_equal(rec.numpy(), t.float().numpy())
    assert np.array_equal(rec.float64(), t.double().numpy())
