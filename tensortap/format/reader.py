"""Reading segments: the only reader-side code that calls h5py.

A committed segment is listed from its index (one read); a `.tmp` segment left by a crash is
scanned batch by batch (format 2; group by group in format 1) up to its last complete one, and the
truncation is reported. A `.tmp`
segment whose writer is still alive is reported as still being written; one that its writer
renames to its final name while we look is re-found under that name (live.py). Every dataset is
checked (validate.py) before it is read; a record whose metadata is malformed is set aside with
a one-line problem naming the file, the record and the key, and the rest is read.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import h5py
import numpy as np

from tensortap.errors import FormatError
from tensortap.format import live, opening, schema, validate
from tensortap.format.codecs import STORED
from tensortap.text import human_bytes

# How long a reader waits for a live writer's segment that cannot be read yet (mid-commit).
LIVE_WAIT_S = 3.0
MAX_PROBLEMS = 100  # records set aside that a segment lists one by one
NOT_CLOSED = "not closed (writer killed); every flushed record is kept"
MAX_DEPTH = 32  # directories below a dump directory that are searched for segments


@dataclass
class SegmentInfo:
    """What a segment holds and how it ended."""

    path: str
    committed: bool  # has its index: closed cleanly
    records: int
    root: dict = field(default_factory=dict)
    truncation: str = ""  # why a .tmp segment stops where it does; empty when committed
    live: bool = False  # its writer is still running: not a crash
    problems: list = field(default_factory=list)  # FormatError of each record set aside

    @property
    def truncated(self) -> bool:
        return not self.committed


def is_segment(path: str) -> bool:
    return path.endswith(schema.SUFFIX) or path.endswith(schema.TMP_SUFFIX)


class SegmentReader:
    """One open segment. `metas` lists its records' metadata in write order (when `listing`)."""

    def __init__(self, path: str, listing: bool = True):
        self.path = live.current_name(path)
        try:
            self.file = opening.open_file(self.path)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise FormatError(self.path, f"cannot be opened ({exc.strerror or type(exc).__name__})") from None
        self.metas: list[dict] = []
        self.problems: list[FormatError] = []
        self._unlisted = 0  # problems past MAX_PROBLEMS: counted, not kept
        self.root: dict = {}
        if not listing:  # opened to read tensors: the listing already checked the root
            return
        try:
            self.root = validate.check_root(self.path, {**self._root_attrs(), **read_sidecar(self.path)})
            self.metas, self.info = self._list()
        except FormatError:
            self.file.close()
            raise
        except Exception as exc:
            self.file.close()
            raise FormatError(self.path, f"corrupted segment ({type(exc).__name__}: {exc})",
                              validate.NOT_A_DUMP_FIX) from None

    def close(self) -> None:
        self.file.close()

    @property
    def size(self) -> int:
        return opening.file_size(self.file)

    # -- listing ---------------------------------------------------------------------------
    def _root_attrs(self) -> dict:
        root, size = {}, self.size
        for key in self.file.attrs:
            value = validate.read_attr(self.path, self.file, key, schema.MAX_META_CHARS, size)
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            if key in schema.ROOT_JSON and isinstance(value, str):
                value = validate.parse_json(self.path, value, f"root attribute '{key}'", kind=object)
            elif isinstance(value, np.generic):
                value = value.item()
            elif isinstance(value, np.ndarray):
                if value.size > 4096:
                    raise FormatError(self.path, f"root attribute '{key}' holds {value.size} values")
                value = value.tolist()
            root[key] = value
        return root

    def _records_group(self) -> h5py.Group:
        link = self.file.get(schema.RECORDS_GROUP, getlink=True)
        if not isinstance(link, h5py.HardLink) or not isinstance(self.file[schema.RECORDS_GROUP], h5py.Group):
            raise FormatError(self.path, f"no '/{schema.RECORDS_GROUP}' group", validate.NOT_A_DUMP_FIX)
        return self.file[schema.RECORDS_GROUP]

    @property
    def batched(self) -> bool:
        """Format 2 and later: records live in batch datasets."""
        return self.root.get("tensortap_format", 1) >= schema.BATCHED_VERSION

    def _list(self) -> tuple[list[dict], SegmentInfo]:
        records = self._records_group()
        if schema.INDEX_DATASET + "_meta" in self.file:
            metas = self._from_index()
            self._check_declared(metas)
            self._count_unlisted()
            return metas, SegmentInfo(self.path, True, len(metas), self.root, problems=self.problems)
        metas, truncation = self._scan_batches(records) if self.batched else self._scan(records)
        self._count_unlisted()
        self._check_declared(metas)
        return metas, SegmentInfo(self.path, False, len(metas), self.root, truncation, problems=self.problems)

    def _check_declared(self, metas: list[dict]) -> None:
        """What the records declare must fit in the file: uncompressed, every stored byte is in it;
        compressed (or unknown), a record inflates to at most validate.MAX_INFLATED_BYTES and the file
        to at most MAX_INFLATE_RATIO times its size. A file that lies about this is refused whole, before
        a reader allocates what it claims (a 40 KB file declaring uint8 [2^36])."""
        size = self.size
        config = self.root.get("config") if isinstance(self.root.get("config"), dict) else {}
        plain = config.get("compress") == "none"
        record_limit = size if plain else min(validate.MAX_INFLATED_BYTES, validate.MAX_INFLATE_RATIO * size)
        total_limit = size if plain else validate.MAX_INFLATE_RATIO * size
        total = 0
        for meta in metas:
            if not meta.get("stored", True):
                continue
            nbytes = math.prod(meta["shape"]) * STORED[meta["dtype"]][0].itemsize
            total += nbytes
            if nbytes > record_limit or total > total_limit:
                how = "" if plain else f" (compressed records inflate to at most {human_bytes(record_limit)})"
                raise FormatError(self.path, f"record {meta['seq']} ({meta['name']}) declares {human_bytes(nbytes)} "
                                             f"in a {human_bytes(size)} file{how}; refusing the file",
                                  validate.NOT_A_DUMP_FIX)

    def _problem(self, exc: FormatError) -> None:
        """Keep a record's problem: the first MAX_PROBLEMS of a segment, the rest only counted (a hostile
        file could hold millions)."""
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(exc)
        else:
            self._unlisted += 1

    def _count_unlisted(self) -> None:
        if self._unlisted:
            self.problems.append(FormatError(self.path, f"{self._unlisted} more record(s) set aside (the first "
                                                        f"{MAX_PROBLEMS} problems are listed)"))

    def _check(self, meta: dict, what: str, batch_bytes: int | None = None) -> dict | None:
        """The record's metadata if valid (with where its bytes are, in format 2: `batch_bytes` is the
        length of its batch dataset when known); else its problem is kept and None returned."""
        try:
            return validate.check_meta(self.path, meta, what, self.root.get("rank"), self.batched, batch_bytes)
        except FormatError as exc:
            self._problem(exc)
            return None

    def _from_index(self) -> list[dict]:
        index_meta = self._member(self.file, schema.INDEX_DATASET + "_meta", h5py.Dataset)
        size = self.size
        if index_meta is not None:
            validate.check_storage(self.path, index_meta, size, exact=index_meta.dtype.kind != "O")
        if index_meta is None or index_meta.ndim != 1 or h5py.check_string_dtype(index_meta.dtype) is None:
            raise FormatError(self.path, "index table is malformed (not a list of JSON strings)",
                              validate.NOT_A_DUMP_FIX)
        declared = self.root.get("records", len(index_meta))
        if len(index_meta) > declared or len(index_meta) > 10_000_000 or len(index_meta) * 16 > size:
            raise FormatError(self.path, "index table is longer than the segment's record count")
        # One entry at a time: entries of a hostile file could all point at one huge string, so the
        # text read so far is bounded by the file's own size.
        budget = size
        metas, strings = [], index_meta.asstr(errors="replace")
        for i in range(len(index_meta)):
            text = strings[i]
            budget -= len(text)
            if budget < 0:
                raise FormatError(self.path, "index entries hold more text than the file has bytes")
            try:
                meta = validate.parse_json(self.path, text, f"index entry {i}")
            except FormatError as exc:
                self._problem(exc)
                continue
            meta = self._check(meta, f"record {meta.get('seq', i)!s:.20}")
            if meta is not None:
                metas.append(meta)
        return metas

    def _scan(self, records: h5py.Group) -> tuple[list[dict], str]:
        """Records of an uncommitted segment, in order, up to the first incomplete one."""
        metas, size = [], self.size
        try:
            names = sorted(records)
        except Exception as exc:
            return metas, f"its record list is unreadable ({type(exc).__name__})"
        for name in names:
            try:
                group = self._group(records, name)
                meta = validate.parse_meta(self.path, group, size)
            except FormatError as exc:
                return metas, f"stops at record {name}: {exc.problem}"
            except Exception as exc:
                return metas, f"stops at record {name}: {type(exc).__name__}"
            meta = self._check(meta, f"record {name}")
            if meta is None:
                continue
            if meta.get("stored", True) and meta["point"] not in group:
                return metas, f"stops at record {name}: it lacks its tensor"
            metas.append(meta)
        return metas, NOT_CLOSED

    def _scan_batches(self, records: h5py.Group) -> tuple[list[dict], str]:
        """Format 2: the records of an uncommitted segment, batch by batch, up to the first incomplete
        batch. If the record list itself cannot be listed (a kill tore its link heap mid-flush), the
        batches are looked up by name, 0, 1, 2, ..., up to the first that cannot be found."""
        metas, size = [], self.size
        try:
            names = sorted(records)
            salvage = ""
        except Exception as exc:
            names = None
            salvage = f"; its record list was torn ({type(exc).__name__}), batches were found by name"
        batch = 0
        while names is None or batch < len(names):
            name = schema.batch_name(batch) if names is None else names[batch]
            try:
                if names is None and records.get(name, getlink=True) is None:
                    break
                dataset = self._batch_dataset(records, name)
                entries = validate.parse_batch_meta(self.path, dataset, size)
            except FormatError as exc:
                return metas, f"stops at batch {name}: {exc.problem}{salvage}"
            except Exception as exc:
                if names is None:
                    break
                return metas, f"stops at batch {name}: {type(exc).__name__}{salvage}"
            if name != schema.batch_name(batch):
                return metas, f"stops at batch {name}: batch {schema.batch_name(batch)} is missing{salvage}"
            for i, entry in enumerate(entries):
                if not isinstance(entry, dict):
                    self._problem(FormatError(self.path, f"batch {name}, entry {i}: not a JSON object"))
                    continue
                meta = self._check(entry, f"record {entry.get('seq', f'{name}[{i}]')!s:.20}", dataset.shape[0])
                if meta is not None and meta["batch"] != batch:
                    self._problem(FormatError(self.path, f"record {meta['seq']}: key 'batch': says "
                                                         f"{meta['batch']}, but it is in batch {batch}"))
                    continue
                if meta is not None:
                    metas.append(meta)
            batch += 1
        return metas, NOT_CLOSED + salvage

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

    def _batch_dataset(self, records: h5py.Group, name: str) -> h5py.Dataset:
        dataset = self._member(records, name, h5py.Dataset)
        if dataset is None:
            raise FormatError(self.path, f"batch '{name}' is missing")
        if dataset.dtype != np.uint8 or dataset.ndim != 1:
            raise FormatError(self.path, f"batch '{name}' is not a 1-D uint8 dataset ({dataset.dtype}, "
                                         f"{dataset.ndim}-D)")
        return dataset

    def _read_span(self, meta: dict, key: str, what: str) -> np.ndarray:
        """Format 2: the bytes [offset, offset + nbytes) of the record's batch that `meta[key]` names."""
        dataset = self._batch_dataset(self.file[schema.RECORDS_GROUP], schema.batch_name(meta["batch"]))
        validate.check_storage(self.path, dataset, self.size)
        offset, nbytes = meta[key]
        if offset + nbytes > dataset.shape[0]:
            raise FormatError(self.path, f"{what}: bytes {offset}..{offset + nbytes} lie outside its batch "
                                         f"({dataset.shape[0]} bytes)")
        out = np.empty(nbytes, dtype=np.uint8)  # [nbytes]
        if nbytes:
            dataset.read_direct(out, source_sel=np.s_[offset:offset + nbytes])
        return out

    def _dataset(self, meta: dict, name: str) -> h5py.Dataset | None:
        group = self._group(self.file[schema.RECORDS_GROUP], schema.record_group_name(meta["seq"]))
        return self._member(group, name, h5py.Dataset)

    def read_array(self, meta: dict) -> np.ndarray:
        """The record's stored array (raw bits for bf16/fp8), checked against its metadata and digest."""
        what = f"record {meta['seq']} ({meta['name']})"
        try:
            if "batch" in meta:
                return self._read_batched(meta, what)
            dataset = self._dataset(meta, meta["point"])
            if dataset is None:
                raise FormatError(self.path, f"{what} holds stats only (mode=stats)")
            size = self.size
            validate.check_dataset(self.path, dataset, STORED[meta["dtype"]][0], size)
            if list(dataset.shape) != list(meta["shape"]):
                raise FormatError(self.path, f"{what}: dataset shape {dataset.shape} != recorded {meta['shape']}")
            out = np.empty(dataset.shape, dtype=dataset.dtype)
            if out.size:
                dataset.read_direct(out)
            validate.check_crc(self.path, dataset, out, what, size)
            return out
        except FormatError:
            raise
        except Exception as exc:
            raise FormatError(self.path, f"{what} is unreadable ({type(exc).__name__}: {exc})") from None

    def _read_batched(self, meta: dict, what: str) -> np.ndarray:
        if "at" not in meta:
            raise FormatError(self.path, f"{what} holds stats only (mode=stats)")
        raw = self._read_span(meta, "at", what)  # [nbytes]
        validate.check_crc_value(self.path, meta.get("crc32"), raw, what)
        return raw.view(STORED[meta["dtype"]][0]).reshape(meta["shape"])

    def read_stats(self, meta: dict) -> np.ndarray | None:
        """The record's per-head ([T, H] norm/zeros) or per-row ([T] valid count) stats array."""
        what = f"stats of record {meta['seq']} ({meta['name']})"
        try:
            if "batch" in meta:
                if "stats_at" not in meta:
                    return None
                dtype, rows = validate.stats_layout(self.path, meta)
                return self._read_span(meta, "stats_at", what).view(dtype).reshape(rows)
            size = self.size
            group = self._group(self.file[schema.RECORDS_GROUP], schema.record_group_name(meta["seq"]))
            value = validate.read_attr(self.path, group, schema.STATS_DATASET, schema.STATS_ATTR_MAX_BYTES, size)
            if value is None:
                dataset = self._dataset(meta, schema.STATS_DATASET)
                if dataset is None:
                    return None
                expected = schema.HEAD_STATS_DTYPE if dataset.dtype.fields else schema.ROW_STATS_DTYPE
                validate.check_dataset(self.path, dataset, expected, size)
                value = dataset[()]
            if not isinstance(value, np.ndarray) or value.dtype not in (schema.HEAD_STATS_DTYPE,
                                                                        schema.ROW_STATS_DTYPE):
                raise FormatError(self.path, f"{what} have dtype {getattr(value, 'dtype', type(value).__name__)}")
            rows = list(meta["shape"][: value.ndim])
            if list(value.shape) != rows:
                raise FormatError(self.path, f"{what} have shape {list(value.shape)}, not {rows} (the record's)")
            return value
        except FormatError:
            raise
        except Exception as exc:
            raise FormatError(self.path, f"{what} are unreadable ({type(exc).__name__})") from None


def read_sidecar(path: str) -> dict:
    """What a writer that failed noted beside its segment (capture_error, records_lost), if anything."""
    sidecar = path + schema.ERROR_SUFFIX
    try:
        fd = opening.open_regular(sidecar)
    except (OSError, FormatError):
        return {}
    try:
        with os.fdopen(fd, "rb") as f:
            text = f.read(1 << 20).decode("utf-8", errors="replace")
        value = validate.parse_json(sidecar, text, "error note")
    except (OSError, FormatError):
        return {}
    note = {}
    if isinstance(value.get("capture_error"), str):
        note["capture_error"] = " ".join(value["capture_error"].split())[:500]
    if isinstance(value.get("records_lost"), int) and not isinstance(value.get("records_lost"), bool):
        note["records_lost"] = value["records_lost"]
    return note


def read_segment(path: str, wait_s: float = LIVE_WAIT_S) -> tuple[SegmentInfo, list[dict]]:
    """(what the segment holds, its valid records' metadata), tolerating a writer that is still at it.

    - renamed from `.tmp` to its final name between the listing and now: read under the new name;
    - a `.tmp` that cannot be read yet (mid-flush or mid-commit) while its writer lives: retried for
      up to `wait_s`, then reported as still being written with no record readable yet;
    - a `.tmp` listed while its writer lives: reported as still being written (not a crash);
      one committed while we listed it is read again, complete, under its final name.
    Unreadable committed segments raise FormatError; an unreadable `.tmp` of a dead writer is
    reported as a crash that left nothing readable."""
    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        opened = live.current_name(path)
        try:
            reader = SegmentReader(opened)
        except FileNotFoundError:
            if live.current_name(path) == opened:
                raise FormatError(path, "vanished while being read (deleted by someone else?)") from None
            continue  # renamed meanwhile: open it under its final name
        except FormatError as exc:
            if not opened.endswith(schema.TMP_SUFFIX):
                raise
            if live.current_name(opened) != opened:
                continue  # committed meanwhile
            writer = live.writer_alive(opened)
            if writer is None and live.current_name(opened) != opened:
                continue
            if writer is not None and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            root = read_sidecar(opened)
            if writer is not None:
                return SegmentInfo(opened, False, 0, root, f"still being written by {writer} "
                                   f"(not readable yet: {exc.problem})", live=True), []
            return SegmentInfo(opened, False, 0, root, f"unreadable, no record survived ({exc.problem})"), []
        try:
            info, metas = reader.info, reader.metas
        finally:
            reader.close()
        if info.committed:
            return info, metas
        if live.current_name(info.path) != info.path:
            continue  # committed while we scanned it: read the final file
        writer = live.writer_alive(info.path, info.root)
        if writer is None and live.current_name(info.path) != info.path:
            continue  # its writer finished the commit while we asked
        if writer is not None:
            info.live = True
            info.truncation = f"still being written by {writer}; {info.records} record(s) readable so far"
        elif live.elsewhere(info.root) and info.truncation.startswith(NOT_CLOSED):
            info.truncation = info.truncation.replace(NOT_CLOSED, (
                f"not closed (its writer on host {live.elsewhere(info.root)} was killed, or is still running there); "
                f"every flushed record is kept"))
        return info, metas


def list_segment_paths(path: str) -> list[str]:
    """Segments under a directory (searched at most MAX_DEPTH levels deep, symbolic links to
    directories not followed), or the file itself."""
    if os.path.isdir(path):
        found, pending = [], [(path, 0)]
        while pending:
            directory, depth = pending.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError as exc:
                raise FormatError(directory, f"cannot list the directory ({exc.strerror})") from None
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    if depth + 1 > MAX_DEPTH:
                        raise FormatError(path, f"holds directories nested more than {MAX_DEPTH} levels deep",
                                          "pass the dump directory itself")
                    pending.append((entry.path, depth + 1))
                elif is_segment(entry.name):
                    found.append(entry.path)
        return sorted(found)
    if os.path.lexists(path):
        return [path]
    raise FormatError(path, "no such file or directory", "pass a dump directory or a .tap.h5 file")
