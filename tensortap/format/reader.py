"""Reading segments: the only reader-side code that calls h5py.

A committed segment is listed from its index (one read); a `.tmp` segment left by a
crash is scanned group by group up to its last complete record, and the truncation
is reported. Every dataset is checked (validate.py) before it is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from tensortap.errors import FormatError
from tensortap.format import schema, validate
from tensortap.format.codecs import STORED

_JSON_ROOT_ATTRS = ("config", "versions", "argv")


@dataclass
class SegmentInfo:
    """What a segment holds and how it ended."""

    path: str
    committed: bool  # has its index: closed cleanly
    records: int
    root: dict = field(default_factory=dict)
    truncation: str = ""  # why a .tmp segment stops where it does; empty when committed

    @property
    def truncated(self) -> bool:
        return not self.committed


def is_segment(path: str) -> bool:
    return path.endswith(schema.SUFFIX) or path.endswith(schema.TMP_SUFFIX)


class SegmentReader:
    """One open segment. `metas` lists its records' metadata in write order."""

    def __init__(self, path: str):
        self.path = path
        self.file = validate.open_file(path)
        try:
            self.root = {**self._root_attrs(), **read_sidecar(path)}
            self.metas, self.info = self._list()
        except FormatError:
            self.file.close()
            raise
        except Exception as exc:
            self.file.close()
            raise FormatError(path, f"corrupted segment ({type(exc).__name__}: {exc})", validate.NOT_A_DUMP_FIX) from None

    def close(self) -> None:
        self.file.close()

    # -- listing ---------------------------------------------------------------------------
    def _root_attrs(self) -> dict:
        root = {}
        for key, value in self.file.attrs.items():
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            if key in _JSON_ROOT_ATTRS and isinstance(value, str):
                value = validate.parse_json(self.path, value, f"root attribute '{key}'", kind=object)
            elif isinstance(value, np.generic):
                value = value.item()
            elif isinstance(value, np.ndarray):
                value = value.tolist()
            root[key] = value
        return root

    def _records_group(self) -> h5py.Group:
        link = self.file.get(schema.RECORDS_GROUP, getlink=True)
        if not isinstance(link, h5py.HardLink) or not isinstance(self.file[schema.RECORDS_GROUP], h5py.Group):
            raise FormatError(self.path, f"no '/{schema.RECORDS_GROUP}' group", validate.NOT_A_DUMP_FIX)
        return self.file[schema.RECORDS_GROUP]

    def _list(self) -> tuple[list[dict], SegmentInfo]:
        records = self._records_group()
        if schema.INDEX_DATASET + "_meta" in self.file:
            metas = self._from_index()
            return metas, SegmentInfo(self.path, True, len(metas), self.root)
        metas, truncation = self._scan(records)
        return metas, SegmentInfo(self.path, False, len(metas), self.root, truncation)

    def _from_index(self) -> list[dict]:
        index_meta = self.file[schema.INDEX_DATASET + "_meta"]
        if not isinstance(index_meta, h5py.Dataset) or index_meta.ndim != 1 or index_meta.dtype.kind != "O":
            raise FormatError(self.path, "index table is malformed", validate.NOT_A_DUMP_FIX)
        if len(index_meta) > self.root.get("records", len(index_meta)) or len(index_meta) > 10_000_000:
            raise FormatError(self.path, "index table is longer than the segment's record count")
        # One entry at a time: entries of a hostile file could all point at one huge string, so the
        # text read so far is bounded by the file's own size.
        budget = os.path.getsize(self.path)
        metas, strings = [], index_meta.asstr()
        for i in range(len(index_meta)):
            text = strings[i]
            budget -= len(text)
            if budget < 0:
                raise FormatError(self.path, "index entries hold more text than the file has bytes")
            meta = validate.parse_json(self.path, text, f"index entry {i}")
            metas.append(validate.check_meta(self.path, meta, f"index entry {i}"))
        return metas

    def _scan(self, records: h5py.Group) -> tuple[list[dict], str]:
        """Records of an uncommitted segment, in order, up to the first incomplete one."""
        metas = []
        for name in sorted(records):
            try:
                group = self._group(records, name)
                meta = validate.check_meta(self.path, validate.parse_meta(self.path, group), f"record {name}")
                if meta.get("stored") and meta.get("point") not in group:
                    raise FormatError(self.path, f"record '{name}' lacks its tensor")
            except FormatError as exc:
                return metas, f"stops at record {name}: {exc.problem}"
            except Exception as exc:
                return metas, f"stops at record {name}: {type(exc).__name__}"
            metas.append(meta)
        return metas, "not closed (writer killed or still running); every flushed record is kept"

    # -- tensors ---------------------------------------------------------------------------
    def _member(self, parent: h5py.Group, name: str, kind: type):
        """parent[name] if it is a hard link to a `kind`; None if absent; refused otherwise."""
        link = parent.get(name, getlink=True)
        if link is None:
            return None
        if not isinstance(link, h5py.HardLink):
            raise FormatError(self.path, f"'{parent.name}/{name}' is not a hard link; refusing to follow it")
        member = parent[name]
        if not isinstance(member, kind):
            raise FormatError(self.path, f"'{parent.name}/{name}' is not a {kind.__name__.lower()}")
        return member

    def _group(self, records: h5py.Group, name: str) -> h5py.Group:
        group = self._member(records, name, h5py.Group)
        if group is None:
            raise FormatError(self.path, f"record '{name}' is missing")
        return group

    def _dataset(self, meta: dict, name: str) -> h5py.Dataset | None:
        group = self._group(self.file[schema.RECORDS_GROUP], schema.record_group_name(int(meta["seq"])))
        return self._member(group, name, h5py.Dataset)

    def read_array(self, meta: dict) -> np.ndarray:
        """The record's stored array (raw bits for bf16/fp8), checked against its metadata."""
        point = str(meta.get("point", ""))
        if not validate.POINT_NAME.fullmatch(point):
            raise FormatError(self.path, f"record {meta.get('seq')} has an invalid point name {point!r}")
        try:
            dataset = self._dataset(meta, point)
            if dataset is None:
                raise FormatError(self.path, f"record {meta.get('seq')} ({meta.get('name')}) holds stats only (mode=stats)")
            dtype_name = str(meta.get("dtype"))
            if dtype_name not in STORED:
                raise FormatError(self.path, f"record {meta.get('seq')} has unknown dtype {dtype_name!r}")
            validate.check_dataset(self.path, dataset, STORED[dtype_name][0])
            if list(dataset.shape) != list(meta.get("shape", [])):
                raise FormatError(
                    self.path, f"record {meta.get('seq')}: dataset shape {dataset.shape} != recorded {meta.get('shape')}"
                )
            out = np.empty(dataset.shape, dtype=dataset.dtype)
            if out.size:
                dataset.read_direct(out)
            return out
        except FormatError:
            raise
        except Exception as exc:
            raise FormatError(self.path, f"record {meta.get('seq')} is unreadable ({type(exc).__name__}: {exc})") from None

    def read_stats(self, meta: dict) -> np.ndarray | None:
        """The record's per-head ([T, H] norm/zeros) or per-row ([T] valid count) stats array."""
        try:
            group = self._group(self.file[schema.RECORDS_GROUP], schema.record_group_name(int(meta["seq"])))
            value = validate.read_attr(self.path, group, schema.STATS_DATASET, schema.STATS_ATTR_MAX_BYTES)
            if value is None:
                dataset = self._dataset(meta, schema.STATS_DATASET)
                if dataset is None:
                    return None
                expected = schema.HEAD_STATS_DTYPE if dataset.dtype.fields else schema.ROW_STATS_DTYPE
                validate.check_dataset(self.path, dataset, expected)
                value = dataset[()]
            if value.dtype not in (schema.HEAD_STATS_DTYPE, schema.ROW_STATS_DTYPE):
                raise FormatError(self.path, f"stats of record {meta.get('seq')} have dtype {value.dtype}")
            return value
        except FormatError:
            raise
        except Exception as exc:
            raise FormatError(self.path, f"stats of record {meta.get('seq')} are unreadable ({type(exc).__name__})") from None


def read_sidecar(path: str) -> dict:
    """What a writer that failed noted beside its segment (capture_error, records_lost), if anything."""
    sidecar = path + schema.ERROR_SUFFIX
    if not os.path.isfile(sidecar) or os.path.getsize(sidecar) > 1 << 20:
        return {}
    try:
        with open(sidecar, encoding="utf-8", errors="replace") as f:
            value = validate.parse_json(sidecar, f.read(), "error note")
    except (OSError, FormatError):
        return {}
    return {k: value[k] for k in ("capture_error", "records_lost") if k in value}


def list_segment_paths(path: str) -> list[str]:
    """Segments under a directory (recursively), or the file itself."""
    if os.path.isdir(path):
        found = []
        for root, _dirs, files in os.walk(path):
            found.extend(os.path.join(root, f) for f in files if is_segment(f))
        return sorted(found)
    if os.path.exists(path):
        return [path]
    raise FormatError(path, "no such file or directory", "pass a dump directory or a .tap.h5 file")
