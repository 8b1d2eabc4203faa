"""Stats computed with torch on the device (capture/device_stats) equal the host stats of the same
tensor (format.stats.compute), through the writer's from_parts; on the CPU here, on a GPU when present."""

import numpy as np
import pytest
import torch

from tensortap.capture import device_stats
from tensortap.format.codecs import dtype_name, encode

stats = pytest.importorskip("tensortap.format.stats")
if not hasattr(stats, "from_parts"):
    pytest.skip("format.stats.from_parts is not there yet", allow_module_level=True)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cases():
    g = torch.Generator().manual_seed(0)
    heads = torch.randn(3, 4, 16, generator=g)  # [T, H, D]
    heads[:, 1] = 0  # a zero head
    heads[0, 2, :5] = 0
    weird = heads.clone()
    weird[1, 3, 2], weird[2, 0, 0], weird[0, 0, 1] = float("nan"), float("inf"), float("-inf")
    idx = torch.randint(-1, 50, (4, 6), dtype=torch.int32, generator=g)  # [T, K]
    idx[2] = -1  # an empty row
    rows = torch.randn(3, 70000, generator=g)  # [T, W]: more than one hash period
    yield "partial_out", heads
    yield "merged_out", weird.bfloat16()
    yield "q", weird.half()
    yield "q", weird.double()
    yield "q", heads.to(torch.float8_e4m3fn)
    yield "lse", weird[:, :, 0]
    yield "lse", torch.full((2, 3), float("-inf"))  # no finite value: absmax 0
    yield "topk", idx
    yield "topk", torch.full((1, 4), -1, dtype=torch.int32)  # T=1, all -1
    yield "slots", torch.zeros(0, 4, dtype=torch.int32)  # a rank that owns nothing
    yield "block_table", torch.arange(12, dtype=torch.int64).view(3, 4)
    yield "kv_pages", torch.randint(0, 255, (2, 4, 656), dtype=torch.uint8, generator=g)
    yield "hidden", rows.bfloat16()
    yield "hidden", weird.reshape(3, -1)
    yield "attn_out", torch.zeros(0, 8)
    yield "o_proj_partial", torch.randn(1, 7, generator=g).double()


def host_compute(tensor: torch.Tensor, point: str):
    array, dtype = encode(tensor.contiguous())
    return stats.compute(array, dtype, point, keep_arrays=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(range(len(list(cases())))))
def test_device_stats_equal_the_host_stats(device, case):
    point, tensor = list(cases())[case]
    parts = {k: v.cpu().numpy() for k, v in device_stats.parts(tensor.to(device), point).items()}
    got_scalars, got_array = stats.from_parts(parts, dtype_name(tensor.dtype), point, list(tensor.shape))
    want_scalars, want_array = host_compute(tensor, point)
    assert got_scalars == want_scalars
    if want_array is None:
        assert got_array is None
    else:
        assert got_array.dtype == want_array.dtype
        for field in want_array.dtype.names or (None,):
            got, want = (got_array, want_array) if field is None else (got_array[field], want_array[field])
            assert np.array_equal(got, want, equal_nan=got.dtype.kind == "f"), field  # bit for bit, NaN == NaN


def test_the_hash_matches_the_numpy_definition():
    x = torch.randn(5, 70001).bfloat16()  # [T, W]
    bits = x.view(torch.int16).numpy().astype(np.int64).reshape(-1)
    w = np.arange(bits.size, dtype=np.int64) % 65521 + 1
    with np.errstate(over="ignore"):
        expected = int((bits * w).sum(dtype=np.int64))
    assert int(device_stats.consensus_hash(x)) == expected == device_stats.host_hash(x.view(torch.int16).numpy())
    y = x.clone()
    y.view(torch.int16)[0, 0] += 1  # one bit
    assert int(device_stats.consensus_hash(y)) != expected
