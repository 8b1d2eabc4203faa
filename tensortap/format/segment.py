"""Writing segments: the only writer-side code that calls h5py.

A segment is created as `.tmp`, flushed after every record (a SIGKILL keeps every
flushed record readable), and at rotation or close gets its index table, is closed,
fsync'd and renamed to its final name (the index is the commit marker).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import h5py
import numpy as np
from h5py import h5a, h5d, h5g, h5s, h5t

from tensortap.format import schema
from tensortap.format.codecs import RAW_BITS, STORED

# Superblock of the 1.8 format: later ones set a "file open for write" flag that makes a
# SIGKILLed segment unreadable without h5clear. Measured here; see DESIGN section 5.
LIBVER = ("v108", "v108")


@dataclass
class PendingRecord:
    """One record as the writer thread hands it to the segment: host arrays and JSON-able metadata."""

    seq: int
    meta: dict
    array: np.ndarray | None  # None in stats mode
    dtype: str
    shape: tuple[int, ...]
    stats: dict = field(default_factory=dict)  # scalar stats (capture/stats.py)
    stats_array: np.ndarray | None = None  # per-(token, head) or per-row stats

    @property
    def nbytes(self) -> int:
        return self.array.nbytes if self.array is not None else 0


def create_private_dir(path: str) -> None:
    """Create `path` (and parents) 0700; an existing directory is left as the user made it."""
    os.makedirs(path, mode=0o700, exist_ok=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SegmentWriter:
    """Rotating segments of one process. Not thread-safe: only the writer thread calls it."""

    def __init__(
        self,
        directory: str,
        rank: int,
        root_attrs: dict,
        compress: str = "none",
        segment_records: int = 20_000,
        segment_bytes: int = 2 << 30,
    ):
        self.directory = directory
        self.rank = rank
        self.root_attrs = root_attrs
        self.segment_records = segment_records
        self.segment_bytes = segment_bytes
        self._dataset_options = {} if compress == "none" else {"compression": compress, "chunks": True}
        self._host = str(root_attrs.get("host", "host"))
        self._pid = int(root_attrs.get("pid", os.getpid()))
        self._seg = 0
        self._file: h5py.File | None = None
        self._tmp_path = ""
        self._rows: list[tuple] = []
        self._metas: list[str] = []
        self._bytes = 0
        self.paths: list[str] = []  # closed segments

    # -- records ---------------------------------------------------------------------------
    def write(self, rec: PendingRecord) -> None:
        """Write one record and flush: from here on a SIGKILL cannot take it away."""
        if self._file is None:
            self._open_next()
        meta_json = json.dumps(rec.meta, separators=(",", ":"), allow_nan=True)
        group = h5g.create(self._records.id, schema.record_group_name(rec.seq).encode())
        if rec.array is not None:
            dataset = self._write_tensor(group, rec.meta["point"], rec.array)
            if rec.dtype in RAW_BITS:
                _write_text_attr(dataset, schema.DTYPE_ATTR, rec.dtype)
        if rec.stats_array is not None:
            if rec.stats_array.nbytes <= schema.STATS_ATTR_MAX_BYTES:
                _write_array_attr(group, schema.STATS_DATASET, rec.stats_array)
            else:
                _write_dataset(group, schema.STATS_DATASET, rec.stats_array)
        _write_text_attr(group, schema.META_ATTR, meta_json)
        self._file.flush()
        self._rows.append(_index_row(rec))
        self._metas.append(meta_json)
        self._bytes += rec.nbytes
        if len(self._rows) >= self.segment_records or self._bytes >= self.segment_bytes:
            self.close_segment()

    def _write_tensor(self, group, point: str, array: np.ndarray):
        if not self._dataset_options:
            return _write_dataset(group, point, array)
        dataset = h5py.Group(group).create_dataset(point, data=array, **self._dataset_options)
        return dataset.id

    # -- segments --------------------------------------------------------------------------
    def _open_next(self) -> None:
        create_private_dir(self.directory)
        name = schema.segment_name(self.rank, self._host, self._pid, self._seg)
        self._tmp_path = os.path.join(self.directory, name.replace(schema.SUFFIX, schema.TMP_SUFFIX))
        fd = os.open(self._tmp_path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        os.close(fd)
        self._file = h5py.File(self._tmp_path, "w", libver=LIBVER, locking=False)
        attrs = self._file.attrs
        attrs["tensortap_format"] = schema.FORMAT_VERSION
        attrs["segment"] = self._seg
        attrs["opened_ns"] = time.time_ns()
        for key, value in self.root_attrs.items():
            attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
        self._records = self._file.create_group(schema.RECORDS_GROUP)
        self._file.flush()
        self._rows, self._metas, self._bytes = [], [], 0

    def close_segment(self, final_attrs: dict | None = None) -> None:
        """Write the index (commit marker), close, fsync and rename the open segment."""
        if self._file is None:
            return
        f, self._file = self._file, None
        try:
            index = np.array(self._rows, dtype=schema.INDEX_DTYPE)
            f.create_dataset(schema.INDEX_DATASET, data=index)
            f.create_dataset(
                schema.INDEX_DATASET + "_meta",
                data=np.array(self._metas, dtype=object),
                dtype=h5py.string_dtype("utf-8"),
            )
            for key, value in (final_attrs or {}).items():
                f.attrs[key] = value
            f.attrs["records"] = len(self._rows)
            f.attrs["closed_ns"] = time.time_ns()
        finally:
            f.close()
        with open(self._tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        final = self._tmp_path[: -len(".tmp")]
        os.rename(self._tmp_path, final)
        _fsync_dir(self.directory)
        self.paths.append(final)
        self._seg += 1

    def mark_failure(self, attrs: dict) -> None:
        """After a write error: leave the open segment as its last flush left it, and note the loss beside it.

        HDF5 would go on writing (metadata flushes at close) into a file it could not extend, and
        could leave a superblock that claims more than the file holds; its descriptor is pointed
        at /dev/null first. The loss goes to `<segment>.error.json`, best effort."""
        if self._file is None:
            return
        f, self._file = self._file, None
        try:
            fd = f.id.get_vfd_handle()
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, fd)
            os.close(devnull)
        except Exception:
            pass
        try:
            f.close()
        except Exception:
            pass
        try:
            sidecar = self._tmp_path + schema.ERROR_SUFFIX
            fd = os.open(sidecar, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(dict(attrs, records=len(self._rows)), out)
        except Exception:
            pass

    @property
    def open_path(self) -> str | None:
        return self._tmp_path if self._file is not None else None


# h5py's low-level API: the high-level one costs ~70 us of Python per attribute (measured here).
def _write_dataset(location, name: str, data: np.ndarray):
    space = h5s.create_simple(data.shape) if data.ndim else h5s.create(h5s.SCALAR)
    dataset = h5d.create(location, name.encode(), h5t.py_create(data.dtype, logical=True), space)
    if data.size:
        dataset.write(h5s.ALL, h5s.ALL, np.ascontiguousarray(data) if data.ndim else data)
    return dataset


def _write_text_attr(location, name: str, text: str) -> None:
    raw = text.encode("utf-8")
    string_type = h5t.C_S1.copy()
    string_type.set_size(max(len(raw), 1))
    string_type.set_strpad(h5t.STR_NULLPAD)
    string_type.set_cset(h5t.CSET_UTF8)
    attr = h5a.create(location, name.encode(), string_type, h5s.create(h5s.SCALAR))
    attr.write(np.array(raw, dtype=f"S{max(len(raw), 1)}"), mtype=string_type)


def _write_array_attr(location, name: str, data: np.ndarray) -> None:
    attr = h5a.create(location, name.encode(), h5t.py_create(data.dtype, logical=True), h5s.create_simple(data.shape))
    attr.write(np.ascontiguousarray(data))


def _index_row(rec: PendingRecord) -> tuple:
    nbytes = int(np.prod(rec.shape, dtype=np.int64)) * STORED[rec.dtype][0].itemsize
    return schema.index_row(rec.meta, tuple(rec.shape), nbytes, rec.array is not None, rec.stats)
