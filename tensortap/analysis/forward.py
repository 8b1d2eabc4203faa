"""One forward of one layer (step, layer, role, spec_pos) across ranks: what each detector looks at.

Tensors are read on first use and cached for this forward only, so the analyzer holds at
most one forward's tensors at a time, whatever the dump's size.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from tensortap.analysis import layout
from tensortap.dump import Dump, Record
from tensortap.format.codecs import FLOAT_NAMES
from tensortap.vocab import FORWARD_KEYS  # noqa: F401  (re-exported)


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
            if exact:
                value = rec.raw()
            elif rec.dtype in FLOAT_NAMES:
                value = rec.float64()
            else:
                value = rec.raw().astype(np.int64, copy=False)
            self.bytes_read += rec.nbytes
            self._cache[key] = value
        return self._cache[key]

    def release(self) -> None:
        """Drop the tensors read so far (the records stay)."""
        self._cache.clear()

    def dcp_groups(self) -> list[list[int]]:
        return layout.dcp_groups(self.metas())

    def tp_groups(self) -> list[list[int]]:
        return layout.tp_groups(self.metas())


def forwards(dump: Dump) -> Iterator[Forward]:
    """Every forward in the dump, in capture order."""
    for key, sub in dump.group_by(*FORWARD_KEYS).items():
        yield Forward(key, sub)
