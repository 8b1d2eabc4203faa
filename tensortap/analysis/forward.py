"""One forward of one layer (step, layer, role, spec_pos) across ranks: what each detector looks at.

Tensors are read on first use and cached for this forward only, so the analyzer holds at
most one forward's tensors at a time, whatever the dump's size.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from tensortap.analysis import layout
from tensortap.dump import Dump
from tensortap.record import Record
from tensortap.format.codecs import FLOAT_NAMES
from tensortap.vocab import EVENT_POINTS, FORWARD_KEYS  # noqa: F401  (FORWARD_KEYS re-exported)


class Forward:
    def __init__(self, key: tuple, records: Dump):
        self.step, self.layer, self.role, self.spec_pos = key
        self._records: dict[tuple[str, int], Record] = {}
        self.duplicates = 0  # records of one (point, rank) beyond the first: no step/spec_pos tells them apart
        for rec in records.iter():
            if (rec.point, rec.rank) in self._records:
                self.duplicates += 1
                continue
            self._records[(rec.point, rec.rank)] = rec
        self._cache: dict[tuple[str, int, str], np.ndarray] = {}
        self.bytes_read = 0
        self.status: dict[str, tuple] = {}
        self.last_record: Record | None = None  # the record read last: named when a detector fails  # detector code -> why it did not verify this forward in full

    # -- coverage: what a detector could not do on this forward ----------------------------------------
    def skip(self, code: str, reason: str, gap: bool = False) -> None:
        """`code` could not check (part of) this forward. `gap`: a bug could cause this reason."""
        prior = self.status.get(code)
        if prior is None or prior[0] == "inapplicable" or (gap and not prior[2]):
            self.status[code] = ("skipped", reason, gap)

    def inapplicable(self, code: str, reason: str) -> None:
        """Nothing in this forward for `code` to check (e.g. DCP 1 for the merge audit)."""
        self.status.setdefault(code, ("inapplicable", reason))

    def needs_tensors(self, code: str, point: str, rank: int) -> None:
        self.skip(code, f"needs full tensors of {point} (stats only, mode=stats)")

    # -- records and metadata --------------------------------------------------------------------
    def record(self, point: str, rank: int) -> Record | None:
        return self._records.get((point, rank))

    def ranks(self, point: str | None = None) -> list[int]:
        return sorted({r for (p, r) in self._records if point is None or p == point})

    def items(self) -> list[Record]:
        """Every record of the forward, by rank then point."""
        return [self._records[k] for k in sorted(self._records, key=lambda k: (k[1], k[0]))]

    def records(self, point: str) -> list[Record]:
        return [self._records[(point, r)] for r in self.ranks(point)]

    def meta(self, rank: int) -> dict:
        for (point, r), rec in self._records.items():
            if r == rank:
                return rec.meta
        return {}

    def metas(self) -> dict[int, dict]:
        return {rank: self.meta(rank) for rank in self.ranks()}

    def describe_last(self) -> str:
        rec = self.last_record
        if rec is None:
            return ""
        return f"{rec.name} rank {rec.rank} seq {rec.meta.get('seq')} in {rec.path}"

    def where(self, **extra) -> dict:
        """Location fields of a finding in this forward."""
        return dict(step=self.step, layer=self.layer, role=self.role, spec_pos=self.spec_pos, **extra)

    # -- tensors ----------------------------------------------------------------------------------
    def array(self, point: str, rank: int, exact: bool = False) -> np.ndarray | None:
        """The tensor as float64 (floats) or int64 (indices); raw bits with `exact`. None if absent or stats-only."""
        rec = self.record(point, rank)
        if rec is None or not rec.stored:
            return None
        key = (point, rank, "raw" if exact else "value")
        if key not in self._cache:
            self.last_record = rec
            if exact:
                value = rec.raw()
            elif rec.dtype in FLOAT_NAMES:
                value = rec.float64()
            else:
                value = rec.raw().astype(np.int64, copy=False)
            self.bytes_read += rec.nbytes
            self._cache[key] = value
        return self._cache[key]

    def stats_array(self, point: str, rank: int) -> np.ndarray | None:
        """The capture-time stats array (head norm/zeros [T, H], valid-per-row [T]) of a record, or None."""
        rec = self.record(point, rank)
        if rec is None:
            return None
        key = (point, rank, "stats")
        if key not in self._cache:
            self.last_record = rec
            self._cache[key] = rec.stats_array()
        return self._cache[key]

    def rows_valid(self, point: str, rank: int) -> np.ndarray | None:
        """[T] number of valid (>= 0) indices per row of an index point, from the tensor or its stats."""
        arr = self.array(point, rank)
        if arr is not None:
            return (arr >= 0).sum(axis=-1) if arr.ndim == 2 else None  # [T]
        stats = self.stats_array(point, rank)
        return None if stats is None or stats.ndim != 1 else stats.astype(np.int64)  # [T]

    def stored(self, point: str, rank: int) -> bool:
        rec = self.record(point, rank)
        return rec is not None and rec.stored

    def release(self) -> None:
        """Drop the tensors read so far (the records stay)."""
        self._cache.clear()

    def dcp_groups(self) -> list[list[int]]:
        return layout.dcp_groups(self.metas())

    def tp_groups(self) -> list[list[int]]:
        return layout.tp_groups(self.metas())


def forwards(dump: Dump) -> Iterator[Forward]:
    """Every forward in the dump, in capture order."""
    points = dump.points
    tensors = dump if not set(points) & set(EVENT_POINTS) else dump.select(point=[p for p in points if p not in EVENT_POINTS])
    for key, sub in tensors.group_by(*FORWARD_KEYS).items():
        yield Forward(key, sub)
