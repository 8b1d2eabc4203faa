"""The on-disk layout of a tensortap segment (format version 1). No h5py here: names and numbers only.

A dump is a directory of segments, one writer process writing one sequence of them:

    <dir>/rank{R:05d}-{host}-{pid}.{seg:05d}.tap.h5      closed, committed
    <dir>/rank{R:05d}-{host}-{pid}.{seg:05d}.tap.h5.tmp  being written, or left by a crash

Inside a segment (HDF5, superblock of the 1.8 format so that a crashed file still opens):

    /                     attrs: tensortap_format=1, identity (host, pid, ...), config (JSON)
    /records/{seq:012d}   one group per record
        attrs: meta       JSON: every metadata field of the record (DESIGN section 3)
        <point>           the tensor; bfloat16 and float8 as raw bits with a `dtype` attribute
        _stats            capture-time stats (head stats [T, H] or valid-per-row [T]): an attribute
                          up to 32 KiB, a dataset beyond
    /index                compound table of every record (INDEX_DTYPE), written at close:
                          its presence is the commit marker
"""

from __future__ import annotations

import numpy as np

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
SUFFIX = ".tap.h5"
TMP_SUFFIX = ".tap.h5.tmp"
ERROR_SUFFIX = ".error.json"  # beside a segment whose writer hit an error: what was lost
RECORDS_GROUP = "records"
INDEX_DATASET = "index"
META_ATTR = "meta"
DTYPE_ATTR = "dtype"
STATS_DATASET = "_stats"

# Largest tensor a reader accepts in one record, and largest JSON attribute: bounds against hostile files.
MAX_RECORD_BYTES = 64 << 30
MAX_META_CHARS = 64 << 20
MAX_NDIM = 8

# Points whose dimension 1 is heads: [T, H, D] tensors and the [T, H] LSE.
HEAD_POINTS = ("q", "partial_out", "merged_out")
LSE_POINTS = ("lse",)
# Points holding token indices with -1 padding: [T, K].
INDEX_POINTS = ("topk", "slots")

# Stats arrays up to this size are an attribute of the record's group (cheaper than a dataset).
STATS_ATTR_MAX_BYTES = 32 << 10
HEAD_STATS_DTYPE = np.dtype([("norm", "<f4"), ("zeros", "<i4")])
ROW_STATS_DTYPE = np.dtype("<i4")

# Fields the index table holds for each record, in addition to the full JSON metadata.
INDEX_DTYPE = np.dtype(
    [
        ("seq", "<i8"),
        ("step", "<i8"),
        ("layer", "<i4"),
        ("spec_pos", "<i4"),
        ("rank", "<i4"),
        ("role", "S16"),
        ("point", "S32"),
        ("name", "S128"),
        ("dtype", "S16"),
        ("ndim", "<i4"),
        ("shape", "<i8", (MAX_NDIM,)),
        ("nbytes", "<i8"),
        ("stored", "u1"),
        ("nonfinite", "<i8"),
        ("absmax", "<f8"),
        ("zero_heads", "<i4"),
        ("empty_rows", "<i4"),
        ("dropped_before", "<i8"),
        ("time_ns", "<i8"),
    ]
)

def segment_name(rank: int, host: str, pid: int, seg: int) -> str:
    safe_host = "".join(c if c.isalnum() or c in "._" else "_" for c in host)[:64] or "host"
    return f"rank{rank:05d}-{safe_host}-{pid}.{seg:05d}{SUFFIX}"


def record_group_name(seq: int) -> str:
    return f"{seq:012d}"
