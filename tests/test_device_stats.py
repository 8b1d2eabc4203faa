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
    yield "slots", torch.tensor([[-(2**31), 5, -1], [3, -1, 7]], dtype=torch.int32)  # |int32 min| does not fit int32
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



def row_cases():
    """(point, tensor, n) for the cases with rows along dimension 0 (not kv_pages/block_table), with
    row counts to keep: none, one, half, all."""
    for point, tensor in cases():
        if point not in ("kv_pages", "block_table") and tensor.dim() >= 1:
            for n in sorted({0, min(1, tensor.shape[0]), tensor.shape[0] // 2, tensor.shape[0]}):
                yield point, tensor, n


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.is_floating_point else t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(range(len(list(row_cases())))))
def test_per_row_partials_finished_for_n_rows_equal_the_parts_of_those_rows(device, case):
    """Graph slots hold the partials per row; finish(., n) on the host gives exactly parts(x[:n])."""
    point, tensor, n = list(row_cases())[case]
    padded = device_stats.partials(tensor.to(device), point, rows=True)
    global_keys = ("part:buckets", "part:absmax", "part:min", "part:max", "part:hash")
    assert not any(key in padded for key in global_keys), "per row, nothing is reduced over the rows"
    got = device_stats.finish({k: v.cpu() for k, v in padded.items()}, n)
    want = {k: v.cpu() for k, v in device_stats.parts(tensor[:n].contiguous().to(device), point).items()}
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert torch.equal(bits(got[key]), bits(want[key])), key  # bit for bit, NaN == NaN


def test_junk_padding_rows_do_not_reach_the_finished_stats():
    x = torch.randn(6, 4, 8)  # [T, H, D]: rows 4 and 5 are graph padding
    x[4:] = float("nan")
    x[5, 0, 0] = float("inf")
    rows = device_stats.partials(x, "merged_out", rows=True)
    real = {k: v.numpy() for k, v in device_stats.finish(rows, 4).items()}
    scalars, array = stats.from_parts(real, "float32", "merged_out", [4, 4, 8])
    assert scalars["nonfinite"] == 0 and scalars["absmax"] == float(x[:4].abs().max()) and array.shape == (4, 4)
    everything = {k: v.numpy() for k, v in device_stats.finish(rows).items()}
    assert stats.from_parts(everything, "float32", "merged_out", [6, 4, 8])[0]["nonfinite"] == 2 * 4 * 8


class _Operations(torch.utils._python_dispatch.TorchDispatchMode):
    """The aten operations that make a tensor (views are free): what the caller launches, one kernel
    each (on CUDA a float64 norm of another dtype adds its cast)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("point, tensor, most", [  # before the partials: 12, 8, 11, 6 and 4 operations
    ("merged_out", torch.randn(3, 4, 16).bfloat16(), 8),  # scalars 5, norm 1, zero count 2
    ("lse", torch.randn(3, 4), 5),
    ("hidden", torch.randn(3, 70).bfloat16(), 7),  # hash 2, scalars 5
    ("topk", torch.randint(-1, 9, (3, 6), dtype=torch.int32), 3),  # aminmax, valid 2
    ("block_table", torch.arange(12).view(3, 4), 1),
])
def test_the_caller_launches_only_the_partials(point, tensor, most):
    device_stats.partials(tensor, point)  # the cached constants are made once
    with _Operations() as made:
        device_stats.partials(tensor, point)
    assert len(made.ops) <= most, made.ops
