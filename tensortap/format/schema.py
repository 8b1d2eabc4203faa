"""The on-disk layout of a tensortap segment (format version 2; version 1 is still read). No h5py here.

A dump is a directory of segments, one writer process writing one sequence of them:

    <dir>/rank{R:05d}-{host}-{pid}-{run_id}.{seg:05d}.tap.h5      closed, committed
    <dir>/rank{R:05d}-{host}-{pid}-{run_id}.{seg:05d}.tap.h5.tmp  being written, or left by a crash
    (files from before run ids have no `-{run_id}`; no write ever replaces an existing segment)

Inside a segment (HDF5, superblock of the 1.8 format so that a crashed file still opens):

    /                       attrs: tensortap_format=2, identity (host, pid, ...), config (JSON)
    /records/{batch:012d}   one uint8 dataset per committed batch (one forward; batches 0, 1, 2, ...
                            of the segment): the stored bytes of its records back to back, each
                            starting at a multiple of BATCH_ALIGN
        attrs: meta         JSON list: each record's metadata (DESIGN section 3), with where its
                            bytes are: "batch" (this dataset's number), "at": [offset, nbytes] of the
                            tensor (stored records; bfloat16 and float8 as raw bits, named by "dtype"),
                            "stats_at": [offset, nbytes] of its stats array (head stats [T, H] or
                            valid-per-row [T]) and, with checksum=on, "crc32" (zlib.crc32 of the
                            tensor's stored bytes)
    /index                  compound table of every record (INDEX_DTYPE), and /index_meta (each
                            record's metadata as above), written at close: the commit marker

One dataset per batch rather than a group per record: HDF5 spends ~100 us of CPU per object and
attribute it creates, which per record costs more than the bytes themselves (benchmarks/capture.py).

Format version 1 (still read) has a group per record instead:

    /records/{seq:012d}   attrs: meta (JSON); <point>: the tensor, with `dtype` (raw bits) and
                          `crc32` attributes; _stats: its stats array (an attribute up to 32 KiB)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tensortap import vocab

FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
BATCHED_VERSION = 2  # from this version on, records live in batch datasets
BATCH_ALIGN = 64  # every record's bytes start at a multiple of this in its batch
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
MAX_BATCH_RECORDS = 1 << 16  # records in one batch dataset (the writer commits at most a few hundred)

# The point groups live in the one vocabulary module; re-exported for the format's users.
HEAD_POINTS, LSE_POINTS, INDEX_POINTS = vocab.HEAD_POINTS, vocab.LSE_POINTS, vocab.INDEX_POINTS

# Stats arrays up to this size are an attribute of the record's group (cheaper than a dataset).
STATS_ATTR_MAX_BYTES = 32 << 10
HEAD_STATS_DTYPE = np.dtype([("norm", "<f4"), ("zeros", "<i4")])
ROW_STATS_DTYPE = np.dtype("<i4")



# -- the record schema: every metadata field a record may carry, defined once ----------------------
@dataclass(frozen=True)
class Field:
    """One metadata field of a record.

    kind:    int | float | str | bool | ints (list of int) | list (JSON list) | dict (JSON object)
    system:  set by the capture runtime, not by the caller (a caller's value is replaced)
    choices: the valid values of a str field (empty: any string)
    index:   its column dtype in the segment's index table, if it has one (-1 / "" when absent)
    """

    name: str
    kind: str
    system: bool = False
    choices: tuple = ()
    index: str | None = None


RECORD_FIELDS = (
    # identity of the record (system)
    Field("seq", "int", system=True, index="<i8"),
    Field("name", "str", system=True, index="S128"),
    Field("point", "str", system=True, index="S32"),
    Field("dtype", "str", system=True, index="S16"),
    Field("shape", "ints", system=True),
    Field("time_ns", "int", system=True, index="<i8"),
    Field("run_id", "str", system=True),
    Field("stored", "bool", system=True),
    Field("stats", "dict", system=True),
    Field("dropped_before", "int", system=True, index="<i8"),
    # where the record's bytes are (format 2, set by the segment writer)
    Field("batch", "int", system=True),
    Field("at", "ints", system=True),
    Field("stats_at", "ints", system=True),
    Field("crc32", "int", system=True),
    # where in the run (scope)
    Field("step", "int", index="<i8"),
    Field("layer", "int", index="<i4"),
    Field("role", "str", choices=vocab.ROLES, index="S16"),
    Field("spec_pos", "int", index="<i4"),
    Field("phase", "str", choices=vocab.PHASES, index="S8"),
    Field("req_ids", "list"),
    Field("graph", "int"),
    Field("num_tokens", "int"),
    Field("trigger", "dict"),  # the flight recorder's trigger record: which fired, where, when
    # parallel layout: as the layer believes it, as the process group says, as the cache writer used it
    Field("rank", "int", index="<i4"),
    Field("world_size", "int"),
    Field("tp_rank", "int"),
    Field("tp_size", "int"),
    Field("dcp_rank", "int"),
    Field("dcp_size", "int"),
    Field("group_dcp_rank", "int"),
    Field("group_dcp_size", "int"),
    Field("kv_dcp_size", "int"),
    Field("kv_dcp_rank", "int"),  # the cache writer's rank in its DCP group (integrations: its block table)
    Field("kv_dcp_source", "str", choices=("block_table", "group")),  # where kv_dcp_size was read
    Field("interleave", "int"),
    Field("dcp_comm_backend", "str"),
    Field("dcp_q_replicate", "bool"),
    # attention: what an oracle needs to recompute it
    Field("num_heads", "int"),
    Field("head_offset", "int"),
    Field("seq_lens", "ints"),
    Field("local_seq_lens", "ints"),
    Field("page_ids", "ints"),
    Field("kv_format", "str"),
    Field("block_size", "int"),
    Field("softmax_scale", "float"),
    Field("kv_lora_rank", "int"),
    Field("rope_dim", "int"),
    Field("lse_base", "str", choices=vocab.LSE_BASES),
    Field("hidden_kind", "str", choices=vocab.HIDDEN_KINDS),
)
FIELDS = {f.name: f for f in RECORD_FIELDS}
INT_FIELDS = tuple(f.name for f in RECORD_FIELDS if f.kind == "int")
SYSTEM_FIELDS = tuple(f.name for f in RECORD_FIELDS if f.system)
LOCATION_FIELDS = ("batch", "at", "stats_at", "crc32")  # written by the segment writer, never by a caller
LOCATION_FIELDS_SET = frozenset(LOCATION_FIELDS)
# Integer stats every record's `stats` may carry (format/stats.py), as readers show them.
INT_STATS = ("nonfinite", "nan", "posinf", "neginf", "zero_heads", "empty_rows")

# The index table: the indexed fields, then what the writer derives from the stored array and its stats.
INDEX_DTYPE = np.dtype(
    [(f.name, f.index) for f in RECORD_FIELDS if f.index is not None]
    + [
        ("ndim", "<i4"),
        ("shape", "<i8", (MAX_NDIM,)),
        ("nbytes", "<i8"),
        ("stored", "u1"),
        ("nonfinite", "<i8"),
        ("absmax", "<f8"),
        ("zero_heads", "<i4"),
        ("empty_rows", "<i4"),
    ]
)


# -- root attributes of a segment that readers rely on (the rest are kept as written) ----------------
# The writer's running loss totals, kept current at each flush point (a crashed segment has them too).
LOSS_TOTALS = ("records_total", "bytes_total", "dropped_total", "over_budget_total", "lost_total", "errors_total",
               "graph_skipped_total")
ROOT_INTS = ("tensortap_format", "segment", "opened_ns", "closed_ns", "records", "pid", "ppid", "writer_pid",
             "start_time_ns", "rank", "world_size") + LOSS_TOTALS
ROOT_STRS = ("host", "run_id")
ROOT_JSON = {"config": dict, "versions": dict, "argv": list}  # stored as JSON text


# The range an integer field must fit: its index column's, else int64 (what every reader holds).
_INT_LIMIT = {None: 1 << 63, "<i8": 1 << 63, "<i4": 1 << 31}


def field_problem(key: str, value) -> str | None:
    """Why `value` is not valid for metadata field `key` (None when it is, or the key is not in the
    schema: extra keys are kept as the caller gave them, if JSON can carry them)."""
    field = FIELDS.get(key)
    if value is None or field is None:
        return None
    kind = field.kind
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not -_INT_LIMIT[field.index] <= value < _INT_LIMIT[field.index]:
            return f"{key} is out of range ({value!r}; at most {_INT_LIMIT[field.index] - 1})"
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str) and (not field.choices or value in field.choices)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "ints":
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    elif kind == "list":
        ok = isinstance(value, list)
    else:
        ok = isinstance(value, dict)
    if ok:
        return None
    expected = f"one of {', '.join(field.choices)}" if field.choices else {
        "int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
        "ints": "a list of integers", "list": "a list", "dict": "an object"}[kind]
    return f"{key} is not {expected} ({value!r})"


# (name, width of its string column or 0 for an integer column) of every indexed field, in column order
_INDEXED = tuple((f.name, int(f.index[1:]) if f.index.startswith("S") else 0)
                 for f in RECORD_FIELDS if f.index is not None)


def index_row(meta: dict, shape: tuple, nbytes: int, stored: bool, stats: dict) -> tuple:
    """One row of the index table (INDEX_DTYPE) for a record with JSON metadata `meta`."""
    row = []
    for name, width in _INDEXED:
        value = meta.get(name)
        if width:
            row.append(str(value if value is not None else "").encode()[:width])
        else:
            row.append(-1 if value is None else int(value))
    dims = list(shape)[:MAX_NDIM]
    row += [
        len(shape),
        dims + [0] * (MAX_NDIM - len(dims)),
        nbytes,
        1 if stored else 0,
        int(stats.get("nonfinite", 0)),
        float(stats.get("absmax", 0.0)),
        int(stats.get("zero_heads", -1)),
        int(stats.get("empty_rows", -1)),
    ]
    return tuple(row)


def declared_nbytes(shape, dtype_itemsize: int) -> int:
    return math.prod(shape) * dtype_itemsize


def segment_name(rank: int, host: str, pid: int, seg: int, run_id: str = "") -> str:
    """rank{R:05d}-{host}-{pid}-{run_id}.{seg:05d}.tap.h5 (no `-{run_id}` in files from before run ids)."""
    safe_host = "".join(c if c.isalnum() or c in "._" else "_" for c in host)[:64] or "host"
    run = f"-{run_id}" if run_id else ""
    return f"rank{rank:05d}-{safe_host}-{pid}{run}.{seg:05d}{SUFFIX}"


def record_group_name(seq: int) -> str:
    """Format 1: the group of the record with this seq."""
    return f"{seq:012d}"


def batch_name(batch: int) -> str:
    """Format 2: the dataset of the segment's batch number `batch` (0, 1, 2, ...)."""
    return f"{batch:012d}"
