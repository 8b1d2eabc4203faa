"""Format 2: one uint8 dataset per committed batch, its records' metadata in a JSON list beside it.

What the writer lays out, how a batch is split at a segment's limits, and how the reader treats
batches it did not write: forged, flipped, missing, virtual, or behind a torn record list."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch

import tensortap
from tensortap.errors import FormatError
from tensortap.format import schema
from tensortap.format.codecs import encode

from conftest import segment_files
from test_reader_hostile import forge_v2, meta_of


def _batches(path):
    with h5py.File(path, "r") as f:
        return [(name, batch[()], json.loads(batch.attrs["meta"])) for name, batch in f["records"].items()]


def test_a_scope_is_one_batch_with_aligned_exact_bytes(tap_dir):
    tensortap.configure(dir=tap_dir, writer="thread")
    tensors = {"q": torch.randn(3, 4, 8).bfloat16(), "topk": torch.tensor([[1, -1, 2], [-1, -1, -1], [0, 1, 2]],
               dtype=torch.int32), "lse": torch.randn(3, 4), "kv_pages": torch.randint(0, 255, (2, 5), dtype=torch.uint8)}
    with tensortap.scope(step=4, layer=2):
        for point, tensor in tensors.items():
            tensortap.point(f"layers.2.attn.{point}", tensor)
    tensortap.close()
    (path,) = [os.path.join(tap_dir, name) for name in segment_files(tap_dir)]
    ((name, blob, metas),) = _batches(path)
    assert name == schema.batch_name(0) and blob.dtype == np.uint8
    assert [m["point"] for m in metas] == list(tensors)
    for meta in metas:
        offset, nbytes = meta["at"]
        assert meta["batch"] == 0 and offset % schema.BATCH_ALIGN == 0
        raw = encode(tensors[meta["point"]].contiguous())[0]
        assert blob[offset:offset + nbytes].tobytes() == raw.tobytes()
    assert not any("stats_at" in m for m in metas), "a stored tensor carries no stats array: it is its own"
    d = tensortap.open(tap_dir)
    assert torch.equal(d.get("q", step=4).view(torch.int16), tensors["q"].view(torch.int16))
    assert list(d.record("topk").stats_array()) == [2, 0, 3]


def test_stats_mode_batches_hold_the_stats_arrays(tap_dir):
    tensortap.configure(dir=tap_dir, writer="thread", mode="stats")
    q = torch.randn(2, 3, 16)
    q[:, 1] = 0.0
    with tensortap.scope(step=0, layer=0):
        tensortap.point("layers.0.attn.q", q)
    tensortap.close()
    rec = tensortap.open(tap_dir).record("q")
    assert not rec.stored
    stats = rec.stats_array()
    assert stats.shape == (2, 3) and stats["zeros"][:, 1].tolist() == [16, 16]
    assert np.allclose(stats["norm"], q.double().norm(dim=-1).float().numpy())
    with pytest.raises(FormatError, match="holds stats only"):
        rec.tensor()


def test_a_batch_is_split_at_the_segment_limit(tap_dir):
    tensortap.configure(dir=tap_dir, writer="thread", segment_records=2)
    with tensortap.scope(step=0, layer=0):
        for i in range(5):
            tensortap.point("layers.0.attn.lse", torch.full((2, 2), float(i)), spec_pos=i)
    tensortap.close()
    files = segment_files(tap_dir)
    assert len(files) == 3 and all(f.endswith(".tap.h5") for f in files)
    d = tensortap.open(tap_dir)
    assert not d.truncated and [float(r.tensor()[0, 0]) for r in d.iter()] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_flipped_bytes_fail_their_crc32(tap_dir):
    tensortap.configure(dir=tap_dir, writer="thread", checksum="on")
    with tensortap.scope(step=0, layer=0):
        tensortap.point("layers.0.attn.lse", torch.arange(64, dtype=torch.float32).reshape(4, 16))
        tensortap.point("layers.0.attn.q", torch.ones(2, 2, 8))
    tensortap.close()
    (name,) = segment_files(tap_dir)
    path = os.path.join(tap_dir, name)
    with h5py.File(path, "r+") as f:
        batch = f["records"][schema.batch_name(0)]
        lse = next(m for m in json.loads(batch.attrs["meta"]) if m["point"] == "lse")
        batch[lse["at"][0] + 5] ^= 0x40
    d = tensortap.open(tap_dir)
    assert d.get("q").sum() == 32, "the other record of the batch is intact"
    with pytest.raises(FormatError, match=r"record \d+ \(layers.0.attn.lse\): stored bytes fail their crc32 check"):
        d.get("lse")


def _good_batches(n):
    return [[(meta_of(i), np.full((2, 4), float(i), np.float32))] for i in range(n)]


def test_a_torn_record_list_is_salvaged_by_name(tmp_path, monkeypatch):
    """A kill inside an HDF5 flush can tear the record list's link heap: listing /records fails while
    each batch can still be looked up by its name. The reader finds batches 0, 1, 2, ... by name."""
    path = forge_v2(str(tmp_path / "rank00000-forge-1-f0f0f0.00000.tap.h5.tmp"), _good_batches(3), committed=False)
    listing = h5py.Group.__iter__

    def torn(group):
        if group.name == "/records":
            raise RuntimeError("fractal heap ID not in allocated direct block")
        return listing(group)

    monkeypatch.setattr(h5py.Group, "__iter__", torn)
    d = tensortap.open(path)
    assert [float(r.tensor()[0, 0]) for r in d.iter()] == [0.0, 1.0, 2.0]
    (info,) = d.segments
    assert "batches were found by name" in info.truncation


def test_a_missing_batch_stops_the_scan_there(tmp_path):
    path = forge_v2(str(tmp_path / "rank00000-forge-1-f0f0f0.00000.tap.h5.tmp"), _good_batches(3), committed=False)
    with h5py.File(path, "r+") as f:
        del f["records"][schema.batch_name(1)]
    d = tensortap.open(path)
    assert [r.meta['seq'] for r in d.iter()] == [0]
    assert "batch 000000000001 is missing" in d.segments[0].truncation


def test_a_record_filed_under_another_batch_is_set_aside(tmp_path):
    batches = _good_batches(2)
    batches[1][0][0]["batch"] = 0  # says batch 0, lives in batch 1
    path = forge_v2(str(tmp_path / "rank00000-forge-1-f0f0f0.00000.tap.h5.tmp"), batches, committed=False)
    d = tensortap.open(path)
    assert [r.meta['seq'] for r in d.iter()] == [0]
    assert d.warnings == [f"{path}: record 1: key 'batch': says 0, but it is in batch 1"]


@pytest.mark.parametrize("kind", ["virtual", "float32", "external"])
def test_a_batch_that_is_not_plain_bytes_is_refused(tmp_path, kind):
    source = str(tmp_path / "elsewhere.h5")
    with h5py.File(source, "w") as f:
        f.create_dataset("s", data=np.zeros(320, np.uint8))
    outside = str(tmp_path / "outside.bin")
    with open(outside, "wb") as f:
        f.write(bytes(320))

    def maker(group, name, blob):
        if kind == "virtual":
            layout = h5py.VirtualLayout(shape=blob.shape, dtype=np.uint8)
            layout[:] = h5py.VirtualSource(source, "s", shape=(320,))[: blob.size]
            return group.create_virtual_dataset(name, layout)
        if kind == "external":
            return group.create_dataset(name, shape=blob.shape, dtype=np.uint8, external=[(outside, 0, blob.size)])
        return group.create_dataset(name, data=blob.astype(np.float32))

    path = forge_v2(str(tmp_path / "rank00000-forge-1-f0f0f0.00000.tap.h5"), _good_batches(1), blob_maker=maker,
                    libver=("v108", "latest") if kind != "float32" else ("v108", "v108"))
    d = tensortap.open(path)
    expected = {"virtual": "is a virtual dataset", "float32": "is not a 1-D uint8 dataset",
                "external": "uses external raw storage"}[kind]
    with pytest.raises(FormatError, match=expected):
        d[0].tensor()


def test_a_batch_whose_bytes_failed_to_write_is_never_read(tap_dir, monkeypatch, caplog):
    """Disk full in the middle of a batch's bytes: capture stops with one error, the batches before it
    stay readable, and the failed batch (its dataset may be in the file) has no metadata list, so no
    record of it is read with bytes that were never written."""
    from tensortap import fileio

    real, calls = fileio.write_all, []

    def full_disk(fd, pieces, offset):
        calls.append(offset)
        if len(calls) == 3:
            real(fd, pieces[:1], offset)  # part of it, then the disk is full
            raise OSError(28, "No space left on device")
        real(fd, pieces, offset)

    monkeypatch.setattr(fileio, "write_all", full_disk)
    tensortap.configure(dir=tap_dir, writer="thread")
    for step in range(5):
        with tensortap.scope(step=step, layer=0):
            tensortap.point("layers.0.attn.q", torch.full((2, 4, 512), float(step)))  # 16 KiB: written by pwritev
        tensortap.flush(timeout=30)
    counters = tensortap.stats()
    tensortap.close()
    assert counters["records"] == 2 and counters["lost"] >= 1
    assert any("No space left on device" in r.getMessage() for r in caplog.records)
    d = tensortap.open(tap_dir)
    assert d.steps == [0, 1]
    assert [float(r.tensor()[0, 0, 0]) for r in d.iter()] == [0.0, 1.0]


def test_compressed_batches_stay_small_enough_to_inflate(tap_dir, monkeypatch):
    """A reader inflates at most 1 GiB of one dataset: compressed batches are cut at
    COMPRESSED_BATCH_BYTES (made small here), each record whole, all of them readable."""
    from tensortap.format import segment

    monkeypatch.setattr(segment, "COMPRESSED_BATCH_BYTES", 3000)
    tensortap.configure(dir=tap_dir, writer="thread", compress="gzip")
    with tensortap.scope(step=0, layer=0):
        for i in range(5):
            tensortap.point("layers.0.attn.lse", torch.full((16, 64), float(i)), spec_pos=i)  # 4 KiB each
    tensortap.close()
    (name,) = segment_files(tap_dir)
    assert len(_batches(os.path.join(tap_dir, name))) == 5
    d = tensortap.open(tap_dir)
    assert [float(r.tensor()[3, 7]) for r in d.iter()] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_a_list_of_millions_of_empty_objects_is_refused_early(tmp_path):
    """A hostile 6 MB batch whose `meta` is [{}, {}, ...]: parsing stops once it holds more objects than
    any batch can, in one line, without building millions of dicts and problems."""
    path = str(tmp_path / "rank00000-forge-1-f0f0f0.00000.tap.h5.tmp")
    forge_v2(path, [[]], committed=False)
    with h5py.File(path, "r+") as f:
        f["records"][schema.batch_name(0)].attrs["meta"] = "[" + ",".join(["{}"] * 2_000_000) + "]"
    d = tensortap.open(path)
    assert len(d) == 0 and "holds more than" in d.segments[0].truncation


def test_set_aside_records_are_listed_up_to_a_bound(tmp_path):
    bad = [(dict(meta_of(i), step="x"), np.zeros((2, 4), np.float32)) for i in range(150)]
    path = forge_v2(str(tmp_path / "rank00000-forge-1-f0f0f0.00000.tap.h5"), [bad])
    d = tensortap.open(path)
    assert len(d) == 0 and len(d.warnings) == 101
    assert d.warnings[-1].endswith("50 more record(s) set aside (the first 100 problems are listed)")


def test_batches_are_cut_before_their_metadata_list_gets_too_long(tap_dir, monkeypatch):
    """A reader takes at most 64 MiB of metadata in one attribute: the writer cuts a batch before its
    `meta` list passes BATCH_META_CHARS (made small here), and every record stays readable."""
    from tensortap.format import segment

    monkeypatch.setattr(segment, "BATCH_META_CHARS", 6000)
    tensortap.configure(dir=tap_dir, writer="thread")
    with tensortap.scope(step=0, layer=0, page_ids=list(range(500))):  # ~2.5 KB of JSON per record
        for i in range(5):
            tensortap.point("layers.0.attn.lse", torch.full((4, 4), float(i)), spec_pos=i)
    tensortap.close()
    (name,) = segment_files(tap_dir)
    batches = _batches(os.path.join(tap_dir, name))
    assert len(batches) >= 2 and all(len(json.dumps(m)) <= 6000 for _, _, m in batches)
    d = tensortap.open(tap_dir)
    assert [float(r.tensor()[0, 0]) for r in d.iter()] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_the_io_thread_exits_when_idle_and_comes_back(tmp_path, monkeypatch):
    """The I/O thread leaves after IDLE_S without work (a closed writer leaves no thread behind), and the
    next batch starts it again."""
    import time

    from tensortap import fileio

    monkeypatch.setattr(fileio.IoThread, "IDLE_S", 0.05)
    io = fileio.IoThread()
    path = str(tmp_path / "bytes")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for round_ in range(2):
            payload = np.frombuffer(bytes([65 + round_]) * 3, np.uint8)
            io.start(fd, [payload], 3 * round_)
            io.wait()
            assert io._running
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and io._running:
                time.sleep(0.02)
            assert not io._running, "it exited"
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == b"AAABBB"


def test_a_compact_batchs_bytes_are_in_the_file_before_its_metadata_list(tmp_path, monkeypatch):
    """A batch up to 1 KiB lives in its dataset's object header, which HDF5 may write out once `meta` is
    added to it: its bytes must be in the file by then, else a SIGKILL could leave a listed batch of
    zeros. Checked by scanning the file itself at the moment `meta` is made."""
    from tensortap.format import segment
    from tensortap.format.segment import PendingRecord, SegmentWriter

    data = np.arange(1, 201, dtype=np.float32)  # 800 B: a compact batch
    seen = []
    real = SegmentWriter._text_attr

    def spy(self, location, name, text):
        with open(self._tmp_path, "rb") as f:
            seen.append(data.tobytes() in f.read())
        return real(self, location, name, text)

    monkeypatch.setattr(SegmentWriter, "_text_attr", spy)
    writer = SegmentWriter(str(tmp_path / "tap"), 0, {"host": "h", "pid": 1, "run_id": "r"})
    meta = {"seq": 0, "name": "layers.0.attn.lse", "point": "lse", "step": 0, "layer": 0, "rank": 0,
            "dtype": "float32", "shape": [200], "stats": {}, "stored": True}
    writer.write(PendingRecord(meta, json.dumps(meta), data, "float32", (200,), {}))
    writer.commit()
    writer.close_segment()
    assert seen == [True]
    assert segment.COMPACT_BYTES >= data.nbytes


def test_a_failure_after_a_rotation_counts_the_flushed_part_as_written(tap_dir, monkeypatch):
    """One forward of 5 records with segment_records=2 commits in three parts (2, 2, 1), each flushed. The
    disk fills up in the third: the first four records are readable and counted as written, one is lost.
    (writer=thread here; the writer process reports the same counts in its "E" reply, from the same
    Recorder.)"""
    from tensortap import fileio

    real, calls = fileio.write_all, []

    def full_disk(fd, pieces, offset):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(fd, pieces, offset)

    monkeypatch.setattr(fileio, "write_all", full_disk)
    tensortap.configure(dir=tap_dir, writer="thread", segment_records=2)
    with tensortap.scope(step=0, layer=0):
        for i in range(5):
            tensortap.point("layers.0.attn.q", torch.full((2, 4, 512), float(i)), spec_pos=i)  # 16 KiB each
    tensortap.flush(timeout=30)
    counters = tensortap.stats()
    tensortap.close()
    assert counters["records"] == 4 and counters["lost"] == 1, counters
    d = tensortap.open(tap_dir)
    assert [float(r.tensor()[0, 0, 0]) for r in d.iter()] == [0.0, 1.0, 2.0, 3.0]
