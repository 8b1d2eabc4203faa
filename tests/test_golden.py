"""The checked-in golden dump pins format version 1: this reader must open it and read it exactly."""

import os
import sys

import h5py
import torch

import tensortap

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
from make_golden import expected_records  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden.tap.h5")


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


def test_golden_records_read_exactly():
    d = tensortap.open(GOLDEN)
    expected = expected_records()
    assert len(d) == len(expected) and not d.truncated
    for rec, (name, tensor, meta) in zip(d.iter(), expected):
        assert rec.name == name
        assert rec.rank == 1 and rec.meta["world_size"] == 4 and rec.layer == 3
        for key, value in meta.items():
            assert rec.meta[key] == value, (name, key)
        back = rec.tensor()
        assert back.dtype == tensor.dtype and back.shape == tensor.shape
        assert same_bits(back, tensor), name


def test_golden_stats_and_index():
    d = tensortap.open(GOLDEN)
    frame = d.records
    q = frame[frame.point == "q"].iloc[0]
    assert q["zero_heads"] == 1 and q["dtype"] == "bfloat16" and q["shape"] == (2, 3, 4)
    topk = frame[frame.point == "topk"].iloc[0]
    assert topk["empty_rows"] == 1
    lse = frame[frame.point == "lse"].iloc[0]
    assert lse["nonfinite"] == 3
    assert str(frame["zero_heads"].dtype) == "Int64", "integer columns stay integers where some rows lack them"
    assert list(d.record("topk").stats_array()) == [2, 0]
