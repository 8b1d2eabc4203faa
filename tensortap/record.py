"""`Record`: one captured tensor of a dump, read on demand through a `ReaderPool` of open segments."""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

import numpy as np

from tensortap.errors import FormatError
from tensortap.format import codecs, live, schema
from tensortap.format.reader import LIVE_WAIT_S, SegmentReader

if TYPE_CHECKING:
    from tensortap.dump import Dump


class Record:
    """One captured tensor: its metadata, its capture-time stats, and the tensor on demand."""

    __slots__ = ("meta", "_dump", "_path")

    def __init__(self, meta: dict, dump: "Dump", path: str):
        self.meta = meta
        self._dump = dump
        self._path = path

    name = property(lambda self: self.meta.get("name"))
    point = property(lambda self: self.meta.get("point"))
    step = property(lambda self: self.meta.get("step"))
    layer = property(lambda self: self.meta.get("layer"))
    role = property(lambda self: self.meta.get("role"))
    rank = property(lambda self: self.meta.get("rank"))
    dtype = property(lambda self: self.meta.get("dtype"))
    shape = property(lambda self: tuple(self.meta.get("shape", ())))
    stats = property(lambda self: self.meta.get("stats", {}))
    stored = property(lambda self: bool(self.meta.get("stored", True)))
    path = property(lambda self: self._path)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * codecs.STORED[self.dtype][0].itemsize

    def raw(self) -> np.ndarray:
        """The array as stored: raw bits (uint16/uint8) for bfloat16 and float8."""
        return self._dump._pool.read(self._path, "read_array", self.meta)

    def tensor(self):
        """A torch tensor in the original dtype, bit-exact."""
        return codecs.to_torch(self.raw(), self.dtype)

    def numpy(self) -> np.ndarray:
        """A numpy array: native dtype, or an exact float32 upcast of bfloat16/float8."""
        return codecs.to_numpy(self.raw(), self.dtype)

    def float64(self) -> np.ndarray:
        """Exact float64 values (indices and integers converted too)."""
        return codecs.to_float(self.raw(), self.dtype)

    def stats_array(self) -> np.ndarray | None:
        """Per-(token, head) norm/zeros for head points, valid-per-row for index points.

        Stats mode stores it; full mode derives it from the stored tensor the same way."""
        stored = self._dump._pool.read(self._path, "read_stats", self.meta)
        if stored is None and self.stored:
            from tensortap.format.stats import compute

            return compute(self.raw(), self.dtype, self.point, keep_arrays=True)[1]
        return stored

    def __repr__(self) -> str:
        where = " ".join(f"{k}={self.meta[k]}" for k in ("step", "role", "rank", "spec_pos") if self.meta.get(k) is not None)
        kept = "" if self.stored else " (stats only)"
        return f"<Record {self.name} {where} {self.dtype}{list(self.shape)}{kept}>"


class ReaderPool:
    """Open segments, at most `size` at a time (least recently used is closed first)."""

    def __init__(self, size: int = 32):
        self.size = size
        self._open: collections.OrderedDict[str, SegmentReader] = collections.OrderedDict()

    def get(self, path: str) -> SegmentReader:
        reader = self._open.get(path)
        if reader is not None and reader.path != live.current_name(reader.path):
            reader.close()  # committed since it was opened: read the final file, not a view of it mid-write
            del self._open[path]
            reader = None
        if reader is None:
            try:
                reader = SegmentReader(path, listing=False)  # a renamed .tmp is re-found by its final name
            except FileNotFoundError:
                raise FormatError(path, "vanished since the dump was opened (deleted or moved?)") from None
            self._open[path] = reader
            while len(self._open) > self.size:
                self._open.popitem(last=False)[1].close()
        else:
            self._open.move_to_end(path)
        return reader

    def read(self, path: str, method: str, meta: dict):
        """reader.<method>(meta) for the segment at `path`. A `.tmp` segment whose writer is still at it
        may be caught mid-flush: it is reopened (under its final name once committed) and read again,
        for up to LIVE_WAIT_S."""
        deadline = time.monotonic() + LIVE_WAIT_S
        while True:
            try:
                return getattr(self.get(path), method)(meta)
            except FormatError:
                if not path.endswith(schema.TMP_SUFFIX) or time.monotonic() > deadline:
                    raise
                if live.current_name(path) == path and live.writer_alive(path) is None:
                    raise
                reader = self._open.pop(path, None)
                if reader is not None:
                    reader.close()
                time.sleep(0.02)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()
