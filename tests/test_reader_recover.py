"""A writer SIGKILLed inside an HDF5 flush: the flush's metadata is on disk, the superblock (written
last) still claims the old end of allocation. The reader extends the EOA to the file's size and
reads every record the flush wrote (tensortap/format/recover.py)."""

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

import tensortap
from tensortap.format import recover

# Captures 3 steps, flushes, keeps the superblock as it was, captures 37 more, flushes, and writes a
# copy of the .tmp with the old superblock over it: the file as a kill between the flush's metadata
# writes and its superblock write leaves it. Then it dies without closing.
TORN_FLUSH = r"""
import glob, os, shutil, sys, torch, tensortap
directory, torn = sys.argv[1], sys.argv[2]
tensortap.configure(dir=directory, writer="thread")
def steps(r):
    for s in r:
        with tensortap.scope(step=s, layer=0, role="target"):
            tensortap.point("layers.0.attn.lse", torch.full((2, 4), float(s)))  # [T, H]
            tensortap.point("layers.0.attn.q", torch.full((2, 4, 64), float(s)))  # [T, H, D]
steps(range(3)); tensortap.flush()
(tmp,) = glob.glob(directory + "/*.tmp")
old_superblock = open(tmp, "rb").read(48)
steps(range(3, 40)); tensortap.flush()
shutil.copy(tmp, torn)
with open(torn, "r+b") as f:
    f.write(old_superblock)
os.kill(os.getpid(), 9)
"""


@pytest.fixture(scope="module")
def torn(tmp_path_factory):
    base = tmp_path_factory.mktemp("torn")
    path = str(base / "torn" / "rank00000-host-1-abcd0123.00000.tap.h5.tmp")
    os.makedirs(os.path.dirname(path))
    proc = subprocess.run([sys.executable, "-c", TORN_FLUSH, str(base / "tap"), path], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    return path


def test_lookup3_is_hdf5s_superblock_checksum(tmp_path):
    for n in (1, 7, 300):
        path = str(tmp_path / f"f{n}.h5")
        with h5py.File(path, "w", libver=("v108", "v108")) as f:
            f.create_dataset("x" * n, data=np.arange(n))
        eoa, valid = recover.superblock(open(path, "rb").read(48))
        assert valid and eoa == os.path.getsize(path)


def _batches_hdf5_alone_reads(path) -> int:
    """How many batches plain h5py reads whole (data and metadata) before the first it cannot."""
    with h5py.File(open(path, "rb"), "r") as f:
        try:
            names = sorted(f["records"])
        except Exception:
            return 0
        for count, name in enumerate(names):
            try:
                f["records"][name][()]
                f["records"][name].attrs["meta"]
            except Exception:
                return count
        return len(names)


def test_the_torn_file_is_what_hdf5_alone_cannot_read(torn):
    assert _batches_hdf5_alone_reads(torn) < 40, "the superblock's old EOA hides what the second flush wrote"


def test_every_record_of_the_torn_flush_is_read(torn):
    d = tensortap.open(os.path.dirname(torn))
    assert len(d) == 80 and d.steps == list(range(40))
    assert len(d.truncated) == 1
    for step in (0, 2, 3, 39):
        assert float(d.get("lse", step=step)[1, 3]) == float(step)
        assert float(d.get("q", step=step)[1, 3, 63]) == float(step)


def test_a_healthy_segment_is_read_as_it_is(tmp_path):
    directory = str(tmp_path / "tap")
    tensortap.configure(dir=directory, writer="thread")
    import torch

    with tensortap.scope(step=0, layer=0, role="target"):
        tensortap.point("layers.0.attn.lse", torch.ones(2, 4))  # [T, H]
    tensortap.flush()
    (tmp,) = [os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".tmp")]
    fd = os.open(tmp, os.O_RDONLY)
    try:
        assert recover.eoa_extended_view(fd) is None, "its superblock already covers the file"
    finally:
        os.close(fd)
    tensortap.close()
    shutil.rmtree(directory)
