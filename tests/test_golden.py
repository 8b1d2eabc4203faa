"""The checked-in golden dumps pin format versions 1 and 2: this reader must open them and read them exactly."""

import os
import sys

import json

import h5py
import pytest
import torch

import tensortap

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
from make_golden import expected_records  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden.tap.h5")
GOLDEN_V2 = os.path.join(os.path.dirname(__file__), "data", "golden_v2.tap.h5")
BOTH = pytest.mark.parametrize("path, version", [(GOLDEN, 1), (GOLDEN_V2, 2)])


def same_bits(a, b):
    if a.dtype in (torch.bfloat16,):
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    if a.dtype in (torch.float8_e4m3fn,):
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if a.dtype.is_floating_point:
        return torch.equal(a.view(torch.int32 if a.dtype == torch.float32 else torch.int64),
                           b.view(torch.int32 if b.dtype == torch.float32 else torch.int64))
    return torch.equal(a, b)


def test_golden_file_layout():
    with h5py.File(GOLDEN, "r") as f:
        assert f.attrs["tensortap_format"] == 1
        assert {"records", "index", "index_meta"} <= set(f)
        assert f["records/000000000000/q"].dtype == "<u2"
        assert f["records/000000000000/q"].attrs["dtype"] == b"bfloat16"
        assert f["index"].shape == (6,)


def test_golden_v2_file_layout():
    with h5py.File(GOLDEN_V2, "r") as f:
        assert f.attrs["tensortap_format"] == 2
        assert {"records", "index", "index_meta"} <= set(f)
        (batch,) = f["records"].values()
        assert batch.dtype == "u1" and batch.ndim == 1
        metas = json.loads(batch.attrs["meta"])
        assert [m["name"] for m in metas] == [name for name, _, _ in expected_records(2)]
        q = metas[0]
        assert q["dtype"] == "bfloat16" and q["batch"] == 0 and q["at"] == [0, 2 * 3 * 4 * 2]
        assert all(m["at"][0] % 64 == 0 for m in metas)
        assert f["index"].shape == (6,)


@BOTH
def test_golden_records_read_exactly(path, version):
    d = tensortap.open(path)
    expected = expected_records(version)
    assert len(d) == len(expected) and not d.truncated
    for rec, (name, tensor, meta) in zip(d.iter(), expected):
        assert rec.name == name
        assert rec.rank == 1 and rec.meta["world_size"] == 4 and rec.layer == int(name.split(".")[1])
        for key, value in meta.items():
            assert rec.meta[key] == value, (name, key)
        back = rec.tensor()
        assert back.dtype == tensor.dtype and back.shape == tensor.shape
        assert same_bits(back, tensor), name


@BOTH
def test_golden_stats_and_index(path, version):
    d = tensortap.open(path)
    frame = d.records
    q = frame[(frame.point == "q") & (frame.layer == 3)].iloc[0]
    assert q["zero_heads"] == 1 and q["dtype"] == "bfloat16" and q["shape"] == (2, 3, 4)
    topk = frame[frame.point == "topk"].iloc[0]
    assert topk["empty_rows"] == 1
    lse = frame[frame.point == "lse"].iloc[0]
    assert lse["nonfinite"] == 3
    assert str(frame["zero_heads"].dtype) == "Int64", "integer columns stay integers where some rows lack them"
    assert list(d.record("topk").stats_array()) == [2, 0]
