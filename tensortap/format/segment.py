"""Writing segments: the only writer-side code that calls h5py.

A segment is created as `.tmp` (O_EXCL: no write ever replaces a segment). Records are held until
their batch is committed (`commit`: one forward, or what queued up behind a slow disk); then the
batch becomes one uint8 dataset holding every record's bytes back to back, its `meta` attribute (a
JSON list of the records' metadata, each with where its bytes are) and one HDF5 flush. A SIGKILL
keeps every committed batch readable. At rotation or close the segment gets its index table (the
commit marker), is closed, fsync'd and renamed to its final name without replacing anything.

The bytes of an uncompressed batch go to the file with one pwritev into the space HDF5 allocated
for the dataset (allocated at creation, never filled): no copy, no type conversion, the GIL released,
and the data is in the file before the flush that makes the metadata point at it. Batches up to
1 KiB live in their object header; compressed batches go through h5py (chunked, filtered).

The loss totals (records_total, ..., graph_skipped_total) are root attributes kept current at
every commit, so a crashed segment carries them as of its last flush point. The metadata cache is
kept small: HDF5's flush walks every cached entry, so a large cache makes each commit cost more as
the segment grows (measured here).
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import h5py
import numpy as np
from h5py import h5a, h5d, h5p, h5s, h5t

from tensortap import fileio
from tensortap.format import schema
from tensortap.format.codecs import STORED

# Superblock of the 1.8 format: later ones set a "file open for write" flag that makes a
# SIGKILLed segment unreadable without h5clear. Measured here; see DESIGN section 5.
LIBVER = ("v108", "v108")
METADATA_CACHE_BYTES = 256 << 10
COMPRESSED_BATCH_BYTES = 256 << 20  # a compressed batch dataset holds at most this much (unless one record does)
BATCH_META_CHARS = 16 << 20  # a batch's `meta` list stays under this many characters (unless one record's does)
ENTRY_EXTRA_CHARS = 512  # what completing a record adds to its metadata at most: stats, where its bytes are
COMPACT_BYTES = 1 << 10  # batches up to this size are stored in their object header (no separate block)
_SPACE_CACHE = 512  # distinct shapes whose dataspace ids are kept


@dataclass
class PendingRecord:
    """One record as it goes into a segment: its metadata (as a dict for the index, and as the JSON
    text of its entry in the batch's `meta` list, stats and `stored` included), the stored array
    (None in stats mode) and its stats.

    A stored record may come with `finish`, which computes `stats` from the array and completes
    `meta_json` with them: the segment writer calls it while the batch's bytes are being written
    (`complete`)."""

    meta: dict
    meta_json: str
    array: np.ndarray | None
    dtype: str
    shape: tuple[int, ...]
    stats: dict
    stats_array: np.ndarray | None = None  # per-(token, head) or per-row stats; never with `finish`
    finish: Callable[["PendingRecord"], None] | None = None

    def complete(self) -> None:
        if self.finish is not None:
            finish, self.finish = self.finish, None
            finish(self)

    @property
    def seq(self) -> int:
        return int(self.meta["seq"])

    @property
    def nbytes(self) -> int:
        return self.array.nbytes if self.array is not None else 0


class SegmentWriter:
    """Rotating segments of one writer run. Not thread-safe: only one thread calls it."""

    def __init__(
        self,
        directory: str,
        rank: int,
        root_attrs: dict,
        compress: str = "none",
        segment_records: int = 20_000,
        segment_bytes: int = 2 << 30,
        checksum: bool = False,
    ):
        self.directory = directory
        self.rank = rank
        self.root_attrs = root_attrs
        self.segment_records = segment_records
        self.segment_bytes = segment_bytes
        self.checksum = checksum
        self.compress = compress
        self._dataset_options = {} if compress == "none" else {"compression": compress, "chunks": True}
        self._host = str(root_attrs.get("host", "host"))
        self._pid = int(root_attrs.get("pid", os.getpid()))
        self._run_id = str(root_attrs.get("run_id", ""))
        self._seg = 0
        self._file: h5py.File | None = None
        self._tmp_path = ""
        self._rows: list[tuple] = []
        self._metas: list[str] = []
        self._bytes = 0
        self._dirty = False
        self.totals: dict[str, int] = {}  # the writer's loss totals, written at every commit
        self._written_totals: dict[str, tuple] = {}  # name -> (attribute id, value on disk)
        self._types: dict[str, h5t.TypeID] = {}
        self._spaces: dict[tuple, h5s.SpaceID] = {}
        self._scalar = h5s.create(h5s.SCALAR)
        self._gcpl = h5p.create(h5p.GROUP_CREATE)
        self._gcpl.set_obj_track_times(False)
        self._early = h5p.create(h5p.DATASET_CREATE)  # space at creation, never filled: pwritev fills it
        self._early.set_obj_track_times(False)
        self._early.set_fill_time(h5d.FILL_TIME_NEVER)
        self._early.set_alloc_time(h5d.ALLOC_TIME_EARLY)
        self._compact = h5p.create(h5p.DATASET_CREATE)  # small batches: inside their object header
        self._compact.set_obj_track_times(False)
        self._compact.set_layout(h5d.COMPACT)
        self._u8 = h5t.py_create(np.dtype("u1"))
        self._held: list[PendingRecord] = []  # written, not committed yet
        self._batch = 0  # the next batch dataset's number in the open segment
        self._fd = -1  # the open segment, for pwritev
        self._io: fileio.IoThread | None = None  # started by the first large batch
        self.committed_records = 0  # records of every batch flushed so far, over all segments
        self.committed_bytes = 0  # their stored bytes
        self.paths: list[str] = []  # closed segments

    # -- records ---------------------------------------------------------------------------
    def write(self, rec: PendingRecord) -> None:
        """Hold one record for the next commit (the batch it belongs to)."""
        self._held.append(rec)

    def commit(self) -> None:
        """The flush point of a batch: the held records as batch datasets (split where a segment fills
        up), the totals brought up to date, then one HDF5 flush per segment written."""
        held, self._held = self._held, []
        while held:
            if self._file is None:
                self._open_next()
            room = self._room(held)
            part, held = held[:room], held[room:]
            self._write_batch(part)
            self._flush()
            self.committed_records += len(part)
            self.committed_bytes += sum(rec.nbytes for rec in part)
            if len(self._rows) >= self.segment_records or self._bytes >= self.segment_bytes:
                self.close_segment()
        if self._file is not None and (self._dirty or self._totals_changed()):
            self._flush()

    def _room(self, held: list) -> int:
        """How many of `held` go into the next batch dataset (at least one): up to the open segment's
        record and byte limits; and before its `meta` list would pass BATCH_META_CHARS, or a compressed
        batch COMPRESSED_BATCH_BYTES (readers read at most 64 MiB of metadata in one attribute and
        inflate at most 1 GiB of one dataset)."""
        count, nbytes, batch, chars = len(self._rows), self._bytes, 0, 0
        for i, rec in enumerate(held):
            size = rec.nbytes + (rec.stats_array.nbytes if rec.stats_array is not None else 0)
            text = len(rec.meta_json) + ENTRY_EXTRA_CHARS
            if i and (i >= schema.MAX_BATCH_RECORDS or chars + text > BATCH_META_CHARS
                      or (self._dataset_options and batch + size > COMPRESSED_BATCH_BYTES)):
                return i
            count, nbytes, batch, chars = count + 1, nbytes + rec.nbytes, batch + size, chars + text
            if count >= self.segment_records or nbytes >= self.segment_bytes:
                return i + 1
        return len(held)

    def _flush(self) -> None:
        self._write_totals()
        self._file.flush()
        self._dirty = False

    def _write_batch(self, records: list) -> None:
        """One batch dataset: the records' bytes at BATCH_ALIGN-aligned offsets, their metadata in `meta`.

        A large uncompressed batch's bytes are written by the I/O thread while this thread completes
        the records' stats and metadata: the two overlap, and both run without the GIL for the most
        part (a syscall; numpy loops). The `meta` list is made once the bytes are written."""
        batch = self._batch
        for rec in records:
            if rec.array is None:
                rec.complete()  # a stats array's size is known once it is computed
        pieces, places, offset = [], [], 0
        for rec in records:
            tensor_at = stats_at = None
            if rec.array is not None:
                flat = _bytes_of(rec.array)  # [nbytes]
                tensor_at, offset = (offset, flat), _place(pieces, flat, offset)
            if rec.stats_array is not None:
                flat = _bytes_of(rec.stats_array)  # [nbytes]
                stats_at, offset = (offset, flat.size), _place(pieces, flat, offset)
            places.append((tensor_at, stats_at))
        name = schema.batch_name(batch).encode()
        io = None
        if self._dataset_options:
            blob = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)  # [offset]
            dataset = self._records.create_dataset(name.decode(), data=blob, **self._dataset_options).id
            dataset.flush()  # its chunks leave HDF5's chunk cache for the file before `meta` can
        elif offset <= COMPACT_BYTES:
            dataset = h5d.create(self._records.id, name, self._u8, self._space((offset,)), self._compact)
            if offset:
                dataset.write(h5s.ALL, h5s.ALL, np.concatenate(pieces))  # [offset]
            dataset.flush()  # its bytes live in its header: written out before `meta` is added to it
        else:
            dataset = h5d.create(self._records.id, name, self._u8, self._space((offset,)), self._early)
            io = self._io_thread()
            io.start(self._fd, pieces, dataset.get_offset())
        try:
            texts = []
            for rec, (tensor_at, stats_at) in zip(records, places):
                rec.complete()
                where = [f'"batch":{batch}']
                if tensor_at is not None:
                    at, flat = tensor_at
                    where.append(f'"at":[{at},{flat.size}]')
                    if self.checksum:
                        where.append(f'"crc32":{zlib.crc32(flat) if flat.size else 0}')
                if stats_at is not None:
                    where.append(f'"stats_at":[{stats_at[0]},{stats_at[1]}]')
                body = rec.meta_json.rstrip()[:-1].rstrip()
                texts.append(f'{body}{"," if body != "{" else ""}{",".join(where)}}}')
        finally:
            if io is not None:
                io.wait()  # raises what the write raised (disk full)
        # Only now the list that makes the batch readable: a batch whose bytes could not all be written
        # never gets one (and so is never read), even if HDF5 evicts its dataset's metadata to the file.
        self._text_attr(dataset, schema.META_ATTR, "[" + ",".join(texts) + "]")
        for rec, text in zip(records, texts):
            self._rows.append(_index_row(rec))
            self._metas.append(text)
            self._bytes += rec.nbytes
        self._batch += 1
        self._dirty = True

    def _io_thread(self) -> fileio.IoThread:
        if self._io is None:
            self._io = fileio.IoThread()
        return self._io

    def _type(self, dtype: np.dtype):
        key = dtype.str if dtype.fields is None else str(dtype.descr)
        found = self._types.get(key)
        if found is None:
            found = self._types[key] = h5t.py_create(dtype, logical=True)
        return found

    def _space(self, shape: tuple):
        found = self._spaces.get(shape)
        if found is None:
            if len(self._spaces) >= _SPACE_CACHE:
                self._spaces.clear()
            found = self._spaces[shape] = h5s.create_simple(shape) if shape else h5s.create(h5s.SCALAR)
        return found

    def _text_attr(self, location, name: str, text: str) -> None:
        raw = text.encode("utf-8")
        string_type = h5t.C_S1.copy()
        string_type.set_size(max(len(raw), 1))
        string_type.set_strpad(h5t.STR_NULLPAD)
        string_type.set_cset(h5t.CSET_UTF8)
        attr = h5a.create(location, name.encode(), string_type, self._scalar)
        attr.write(np.array(raw, dtype=f"S{max(len(raw), 1)}"), mtype=string_type)

    def _totals_changed(self) -> bool:
        return any(self._written_totals.get(name, (None, None))[1] != value for name, value in self.totals.items())

    def _write_totals(self) -> None:
        """Root attributes records_total, ..., each rewritten only when its value changed."""
        for name, value in self.totals.items():
            held = self._written_totals.get(name)
            if held is not None and held[1] == value:
                continue
            attr = held[0] if held is not None else h5a.create(self._file.id, name.encode(), h5t.STD_I64LE,
                                                                 self._scalar)
            attr.write(np.array(value, dtype="<i8"))
            self._written_totals[name] = (attr, value)

    # -- segments --------------------------------------------------------------------------
    def _open_next(self) -> None:
        fileio.create_private_dir(self.directory)
        while True:  # the next name free under both its names: never replace a segment
            final = os.path.join(self.directory, self._name())
            self._tmp_path = final[: -len(schema.SUFFIX)] + schema.TMP_SUFFIX
            if os.path.lexists(final):
                self._seg += 1
                continue
            try:
                fd = os.open(self._tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                self._seg += 1
                continue
            os.close(fd)
            break
        self._file = h5py.File(self._tmp_path, "w", libver=LIBVER, locking=False)  # the empty file made above
        config = self._file.id.get_mdc_config()
        config.set_initial_size = True
        config.initial_size = config.min_size = config.max_size = METADATA_CACHE_BYTES
        config.incr_mode = config.decr_mode = config.flash_incr_mode = 0  # fixed size
        self._file.id.set_mdc_config(config)
        attrs = self._file.attrs
        attrs["tensortap_format"] = schema.FORMAT_VERSION
        attrs["segment"] = self._seg
        attrs["opened_ns"] = time.time_ns()
        attrs["writer_pid"] = os.getpid()
        for key, value in self.root_attrs.items():
            attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
        self._records = self._file.create_group(schema.RECORDS_GROUP)
        self._written_totals = {}
        self._rows, self._metas, self._bytes, self._batch = [], [], 0, 0
        self._fd = os.open(self._tmp_path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        self._dirty = True
        for name in schema.LOSS_TOTALS:  # made now, rewritten in place later: the root header never grows
            self.totals.setdefault(name, 0)
        self._write_totals()
        self._file.flush()
        self._dirty = False

    def _name(self) -> str:
        return schema.segment_name(self.rank, self._host, self._pid, self._seg, self._run_id)

    def close_segment(self, final_attrs: dict | None = None) -> None:
        """Commit what is held, write the index (commit marker) and the final totals, close, fsync and
        rename the open segment."""
        if self._held:
            self.commit()
        if self._file is None:
            return
        f, self._file = self._file, None
        try:
            self.totals.update({k: int(v) for k, v in (final_attrs or {}).items() if k in schema.LOSS_TOTALS})
            index = np.array(self._rows, dtype=schema.INDEX_DTYPE)
            f.create_dataset(schema.INDEX_DATASET, data=index)
            f.create_dataset(
                schema.INDEX_DATASET + "_meta",
                data=np.array(self._metas, dtype=object),
                dtype=h5py.string_dtype("utf-8"),
            )
            self._file = f  # for the totals' attribute ids
            self._write_totals()
            self._file = None
            for key, value in (final_attrs or {}).items():
                if key not in schema.LOSS_TOTALS:
                    f.attrs[key] = value
            f.attrs["records"] = len(self._rows)
            f.attrs["closed_ns"] = time.time_ns()
        finally:
            self._file = None
            self._written_totals = {}
            f.close()
        fd, self._fd = self._fd, -1
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        final = self._tmp_path[: -len(".tmp")]
        while True:
            try:
                fileio.rename_no_replace(self._tmp_path, final)
                break
            except FileExistsError:  # someone made that name since we opened: the next free one
                self._seg += 1
                final = os.path.join(self.directory, self._name())
        fileio.fsync_dir(self.directory)
        self.paths.append(final)
        self._seg += 1

    def mark_failure(self, attrs: dict) -> None:
        """After a write error: leave the open segment as its last flush left it, and note the loss beside it.

        HDF5 would go on writing (metadata flushes at close) into a file it could not extend, and
        could leave a superblock that claims more than the file holds; its descriptor is pointed
        at /dev/null first. The loss goes to `<segment>.error.json`, best effort."""
        self._held = []
        if self._fd >= 0:  # also when closing the segment failed half way
            os.close(self._fd)
            self._fd = -1
        if self._file is None:
            return
        f, self._file = self._file, None
        self._written_totals = {}
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


_ZEROS = bytes(schema.BATCH_ALIGN)


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """The stored bytes of an array in C order, without a copy when it is contiguous."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)  # [nbytes]


def _place(pieces: list, flat: np.ndarray, offset: int) -> int:
    """Append `flat` (and the padding to the next BATCH_ALIGN boundary) to `pieces`; the next offset."""
    pieces.append(flat)
    end = offset + flat.size
    pad = -end % schema.BATCH_ALIGN
    if pad:
        pieces.append(np.frombuffer(_ZEROS, np.uint8, pad))  # [pad]
    return end + pad


def _index_row(rec: PendingRecord) -> tuple:
    nbytes = math.prod(rec.shape) * STORED[rec.dtype][0].itemsize
    return schema.index_row(rec.meta, tuple(rec.shape), nbytes, rec.array is not None, rec.stats)
