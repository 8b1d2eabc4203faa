"""Corrupted, truncated, foreign and hostile files: one line naming the file, exit code 2, nothing read outside."""

import json
import os

import h5py
import numpy as np
import pytest
import torch

import tensortap
from tensortap.format import schema


def good_dump(directory: str) -> str:
    tensortap.configure(dir=directory)
    with tensortap.scope(step=0, role="target"):
        tensortap.point("layers.0.attn.q", torch.randn(2, 4, 8))
        tensortap.point("layers.0.attn.lse", torch.randn(2, 4))
    tensortap.close()
    return os.path.join(directory, sorted(os.listdir(directory))[0])


def forged_segment(path: str, make_dataset) -> str:
    """A file that looks like a tensortap segment, with one record whose dataset `make_dataset` builds."""
    meta = {"name": "layers.0.attn.q", "point": "q", "seq": 0, "step": 0, "layer": 0, "rank": 0,
            "dtype": "float32", "shape": [4, 4], "stored": True, "stats": {}}
    with h5py.File(path, "w") as f:
        f.attrs["tensortap_format"] = 1
        group = f.create_group("records").create_group(schema.record_group_name(0))
        group.attrs["meta"] = json.dumps(meta)
        make_dataset(group, f)
    return path


def assert_refused(cli, args, file_hint: str, reason: str):
    code, out, err = cli(args)
    assert code == 2, (out, err)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert file_hint in lines[0] and reason in lines[0], lines[0]
    assert "Traceback" not in err + out


def test_random_bytes(tmp_path, cli):
    path = tmp_path / "rank00000-x-1.00000.tap.h5"
    path.write_bytes(os.urandom(4096))
    assert_refused(cli, ["ls", path], str(path), "not a readable HDF5 file")


def test_truncated_committed_segment(tmp_path, cli):
    path = good_dump(str(tmp_path / "tap"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    code, out, err = cli(["show", path, "q"])
    assert code == 2 and path in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_foreign_hdf5(tmp_path, cli):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(10)
    assert_refused(cli, ["ls", path], str(path), "not a tensortap dump")


def test_unknown_version(tmp_path, cli):
    path = good_dump(str(tmp_path / "tap"))
    with h5py.File(path, "r+") as f:
        f.attrs["tensortap_format"] = 99
    assert_refused(cli, ["ls", path], path, "version 99")


def test_external_storage_pointing_at_etc_passwd(tmp_path, cli):
    def external(group, f):
        group.create_dataset("q", shape=(4, 4), dtype="<f4", external=[("/etc/passwd", 0, 64)])

    path = forged_segment(str(tmp_path / "rank00000-x-1.00000.tap.h5.tmp"), external)
    assert_refused(cli, ["show", path, "q"], path, "external raw storage")
    with pytest.raises(tensortap.FormatError, match="external raw storage"):
        tensortap.open(path).get("q")


def test_external_link(tmp_path, cli):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["q"] = np.zeros((4, 4), np.float32)

    def link(group, f):
        group["q"] = h5py.ExternalLink(str(other), "/q")

    path = forged_segment(str(tmp_path / "rank00000-x-1.00000.tap.h5.tmp"), link)
    assert_refused(cli, ["show", path, "q"], path, "not a hard link")


def test_external_link_at_the_root(tmp_path, cli):
    path = good_dump(str(tmp_path / "tap"))
    with h5py.File(path, "r+") as f:
        f["elsewhere"] = h5py.ExternalLink("/etc/passwd", "/")
    assert_refused(cli, ["ls", path], path, "external link")


def test_dataset_declaring_terabytes(tmp_path, cli):
    def huge(group, f):
        group.create_dataset("q", shape=(1 << 20, 1 << 20), dtype="<f4", chunks=(64, 64))

    path = forged_segment(str(tmp_path / "rank00000-x-1.00000.tap.h5.tmp"), huge)  # metadata says [4, 4]
    assert_refused(cli, ["show", path, "q"], path, "4.0 TiB")


def test_metadata_declaring_terabytes(tmp_path, cli):
    path = good_dump(str(tmp_path / "tap"))
    with h5py.File(path, "r+") as f:  # a committed segment whose index lies about a record's shape
        entries = list(f["index_meta"].asstr()[()])
        meta = json.loads(entries[0])
        meta["shape"] = [1 << 20, 1 << 20]
        f["index_meta"][0] = json.dumps(meta)
    assert_refused(cli, ["ls", path], path, "declares more than")


@pytest.mark.parametrize("field, value, reason", [
    ("dtype", "foo", "unknown dtype"), ("time_ns", "x", "time_ns is not an integer"),
    ("rank", [1], "rank is not an integer"), ("shape", [-1, 3], "invalid shape"),
])
def test_index_metadata_is_checked(tmp_path, cli, field, value, reason):
    path = good_dump(str(tmp_path / "tap"))
    with h5py.File(path, "r+") as f:
        meta = json.loads(list(f["index_meta"].asstr()[()])[1])
        meta[field] = value
        f["index_meta"][1] = json.dumps(meta)
    assert_refused(cli, ["ls", path], path, reason)


def test_contiguous_dataset_larger_than_the_file(tmp_path, cli):
    path = good_dump(str(tmp_path / "tap"))
    with h5py.File(path, "r+") as f:
        records = f["records"]
        batch = records[schema.batch_name(0)]
        meta, size = batch.attrs["meta"], batch.shape[0]
        del records[schema.batch_name(0)]
        forged = records.create_dataset(schema.batch_name(0), shape=(size,), dtype="u1")  # declared, never written
        forged.attrs["meta"] = meta
    assert_refused(cli, ["show", path, "q"], path, "file holds")


def test_virtual_dataset(tmp_path, cli):
    source = tmp_path / "source.h5"
    with h5py.File(source, "w") as f:
        f["data"] = np.zeros((4, 4), np.float32)

    def virtual(group, f):
        layout = h5py.VirtualLayout(shape=(4, 4), dtype="<f4")
        layout[:] = h5py.VirtualSource(str(source), "data", shape=(4, 4))
        group.create_virtual_dataset("q", layout)

    path = forged_segment(str(tmp_path / "rank00000-x-1.00000.tap.h5.tmp"), virtual)
    assert_refused(cli, ["show", path, "q"], path, "virtual dataset")


def test_unknown_filter(tmp_path, cli):
    def scaleoffset(group, f):
        group.create_dataset("q", data=np.zeros((4, 4), np.float32), scaleoffset=4)

    path = forged_segment(str(tmp_path / "rank00000-x-1.00000.tap.h5.tmp"), scaleoffset)
    assert_refused(cli, ["show", path, "q"], path, "filter")


def test_bad_file_among_good_ones_is_named(tmp_path, cli):
    directory = str(tmp_path / "tap")
    good_dump(directory)
    bad = os.path.join(directory, "rank00001-x-2.00000.tap.h5")
    with open(bad, "wb") as f:
        f.write(b"\x89HDF\r\n\x1a\n" + os.urandom(2000))
    assert_refused(cli, ["ls", directory], bad, "not a readable HDF5 file")


def test_metadata_that_is_not_json(tmp_path, cli):
    def ok(group, f):
        group.create_dataset("q", data=np.zeros((4, 4), np.float32))

    path = forged_segment(str(tmp_path / "rank00000-x-1.00000.tap.h5.tmp"), ok)
    with h5py.File(path, "r+") as f:
        f["records/000000000000"].attrs["meta"] = "{not json"
    code, out, err = cli(["ls", path])
    assert code == 0 and "truncated" in out and "not valid JSON" in out, "a .tmp scan stops at the bad record"


def test_missing_path(tmp_path, cli):
    assert_refused(cli, ["ls", tmp_path / "nope"], "nope", "no such file")
