"""`Dump`: a dump as notebooks and the analyzer see it (its records: record.py).

    d = tensortap.open("/scratch/tap")
    d.records                                     # pandas DataFrame, one row per record
    d.get("lse", step=3, layer=78, role="draft", rank=1)   # one torch tensor, exact dtype
    d.stack("partial_out", over="rank", step=3, layer=78, role="draft")
    d["lse", -1]                                  # a sub-dump: point lse, last layer
    for rec in d.iter(point="lse"): rec.meta, rec.tensor()   # streaming, bounded memory
"""

from __future__ import annotations

import collections
import html
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from tensortap import runs as run_ids
from tensortap.config import filter_from
from tensortap.errors import FormatError, SelectionError
from tensortap.format import codecs, schema
from tensortap.format.reader import SegmentInfo, list_segment_paths, read_segment
from tensortap.record import ReaderPool, Record
from tensortap.text import human_bytes, span
from tensortap.vocab import DEFAULT_PHASES, PHASES

_FILTER_KEYS = ("point", "step", "layer", "role", "rank")
_COLUMNS_FIRST = ["name", "point", "step", "layer", "role", "spec_pos", "rank", "world_size", "tp_rank", "tp_size",
                  "dcp_rank", "dcp_size", "group_dcp_rank", "group_dcp_size", "kv_dcp_size", "head_offset",
                  "shape", "dtype", "nbytes", "stored", "nonfinite", "absmax", "zero_heads", "empty_rows"]


_INT_COLUMNS = set(schema.INT_FIELDS) | set(schema.INT_STATS)


@dataclass
class _Source:
    """What every sub-dump of one opened dump shares: its files, runs, phases and problems."""

    segments: list[SegmentInfo]
    pool: ReaderPool
    runs: list = field(default_factory=list)  # runs.Run of every run found
    run_of: dict = field(default_factory=dict)  # segment path -> run id
    problems: list = field(default_factory=list)  # FormatError of each record set aside
    excluded_phases: dict = field(default_factory=dict)  # phase -> records left out


class Dump:
    """A set of records from one or more segments; selections return new Dumps sharing the files."""

    def __init__(self, metas: list[dict], paths: list[str], source: _Source):
        self._metas = metas
        self._paths = paths
        self._source = source
        self._pool = source.pool
        self._frame = None

    segments = property(lambda self: self._source.segments)

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike | Sequence[str | os.PathLike], max_open_files: int = 32,
             run: str | None = None, phases=DEFAULT_PHASES) -> "Dump":
        """Open a directory, a segment file, or a list of them.

        run:    the run to read when the files hold several (its id as `ls` shows it, or a unique
                prefix); "all" reads every run together. Several runs and no `run`: SelectionError.
        phases: the record phases kept ("run" by default: an engine's warmup and CUDA-graph capture
                forwards are left out and counted); "all" keeps every phase.
        Unreadable committed files raise FormatError; records with malformed metadata are set aside
        (`problems`) and the rest is read."""
        keep_phases = _phases(phases)
        targets = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        files = []
        for target in targets:
            files.extend(list_segment_paths(os.fspath(target)))
        files = list(dict.fromkeys(files))
        if not files:
            raise FormatError(targets[0] if targets else "(nothing)", "holds no tensortap segments (*.tap.h5)",
                              "pass a directory written by TAP=...")
        listed = [read_segment(file) for file in files]
        segments = [info for info, _ in listed]
        runs, run_of_segment = run_ids.identify(segments, [metas for _, metas in listed])
        wanted = run_ids.choose(runs, run, os.fspath(targets[0]) if len(targets) == 1 else "these files")
        source = _Source([], ReaderPool(max_open_files), runs)
        metas, paths, starts = [], [], []
        excluded: collections.Counter = collections.Counter()
        for (info, records), run_id in zip(listed, run_of_segment):
            if wanted is not None and run_id not in wanted:
                continue
            source.segments.append(info)
            source.run_of[info.path] = run_id
            source.problems.extend(info.problems)
            start = info.root.get("start_time_ns") or 0
            for meta in records:
                phase = meta.get("phase", "run")
                if keep_phases is not None and phase not in keep_phases:
                    excluded[phase] += 1
                    continue
                metas.append(meta)
                paths.append(info.path)
                starts.append(start)
        source.excluded_phases = dict(excluded)
        order = execution_order(metas, starts)
        return cls([metas[i] for i in order], [paths[i] for i in order], source)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> "Dump":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the index -------------------------------------------------------------------------------
    @property
    def records(self):
        """pandas DataFrame, one row per record: metadata, shape, dtype, nbytes and capture stats."""
        if self._frame is None:
            import pandas as pd

            rows, several_runs = [], len(set(self._source.run_of.values())) > 1
            for meta, path in zip(self._metas, self._paths):
                row = {k: v for k, v in meta.items() if k != "stats"}
                row.update(meta.get("stats", {}))
                row["shape"] = tuple(meta.get("shape", ()))
                row["nbytes"] = int(np.prod(row["shape"], dtype=np.int64)) * codecs.STORED[meta["dtype"]][0].itemsize
                row["file"] = os.path.basename(path)
                if several_runs:
                    row["run"] = self._source.run_of.get(path)
                rows.append(row)
            frame = pd.DataFrame.from_records(rows)
            for column in _INT_COLUMNS.intersection(frame.columns):
                if frame[column].dtype.kind == "f":  # ints with gaps: keep them ints
                    frame[column] = frame[column].astype("Int64")
            if len(frame):
                first = [c for c in _COLUMNS_FIRST if c in frame.columns]
                frame = frame[first + [c for c in frame.columns if c not in first]]
            self._frame = frame
        return self._frame

    def _values(self, key: str) -> list:
        return sorted({m.get(key) for m in self._metas if m.get(key) is not None}, key=_sort_key)

    ranks = property(lambda self: self._values("rank"))
    steps = property(lambda self: self._values("step"))
    layers = property(lambda self: self._values("layer"))
    roles = property(lambda self: self._values("role"))
    points = property(lambda self: self._values("point"))

    @property
    def nbytes(self) -> int:
        return sum(Record(m, self, p).nbytes for m, p in zip(self._metas, self._paths) if m.get("stored", True))

    @property
    def truncated(self) -> list[SegmentInfo]:
        return [s for s in self.segments if not s.committed]

    @property
    def live(self) -> list[SegmentInfo]:
        """Segments still being written by a live writer (part of `truncated`, but not a crash)."""
        return [s for s in self.segments if s.live]

    @property
    def runs(self) -> list:
        """Every run the opened files hold (runs.Run), including those not selected."""
        return self._source.runs

    @property
    def selected_runs(self) -> list:
        """The runs this dump reads (one, unless opened with run="all")."""
        ids = set(self._source.run_of.values())
        return [r for r in self.runs if r.id in ids]

    @property
    def problems(self) -> list[FormatError]:
        """One FormatError per record set aside for malformed metadata (file, record and key named)."""
        return self._source.problems

    @property
    def warnings(self) -> list[str]:
        """The problems as one line each."""
        return [str(p) for p in self.problems]

    @property
    def excluded_phases(self) -> dict[str, int]:
        """Records left out by phase (warmup, capture) when the dump was opened."""
        return self._source.excluded_phases

    @property
    def losses(self):
        """pandas DataFrame, one row per (run, rank): the writers' running totals (schema.LOSS_TOTALS:
        records, bytes, dropped, over_budget, lost, errors, graph_skipped), <NA> where no segment of
        that writer recorded them (runs.losses)."""
        return run_ids.losses(self.segments, self._source.run_of)

    @property
    def dropped(self) -> dict[int, int]:
        """Records dropped by on_full=drop, per rank (the writers' totals and the records' counters)."""
        import pandas as pd

        out: dict[int, int] = collections.defaultdict(int)
        losses = self.losses
        for rank, n in zip(losses["rank"], losses["dropped_total"]):
            if not pd.isna(n):
                out[rank] = max(out[rank], int(n))
        for meta in self._metas:
            out[meta["rank"]] = max(out[meta["rank"]], int(meta.get("dropped_before", 0)))
        return {r: n for r, n in sorted(out.items()) if n}

    @property
    def capture_errors(self) -> list[str]:
        """Write failures recorded by writers (disk full, ...), one line each."""
        return [f"{os.path.basename(s.path)}: {s.root['capture_error']} ({s.root.get('records_lost', '?')} lost)"
                for s in self.segments if s.root.get("capture_error")]

    # -- selection -------------------------------------------------------------------------------
    def select(self, point=None, step=None, layer=None, role=None, rank=None, **equal) -> "Dump":
        """Records matching every filter: ints, ranges/lists, "a-b" strings; negative layers count from the end."""
        self._check_keys(equal)
        if isinstance(point, str) and "." in point:
            equal["name"], point = point, None
        layer = self._resolve_layers(layer)
        flt = filter_from(layers=layer, steps=step, ranks=rank, points=point, roles=role)
        keep = []
        for i, meta in enumerate(self._metas):
            if not flt.keeps(meta.get("point"), meta.get("layer"), meta.get("step"), meta.get("rank"), meta.get("role")):
                continue
            if any(meta.get(k) != v for k, v in equal.items()):
                continue
            keep.append(i)
        return Dump([self._metas[i] for i in keep], [self._paths[i] for i in keep], self._source)

    def _check_keys(self, equal: dict) -> None:
        """Filter keys must be metadata keys: `ranks=1` or `spec=0` would otherwise match nothing, silently."""
        unknown = [k for k in equal if k not in schema.FIELDS]
        if not unknown:
            return
        present = {k for m in self._metas for k in m}
        unknown = [k for k in unknown if k not in present]
        if unknown:
            valid = list(_FILTER_KEYS) + sorted((set(schema.FIELDS) | present) - set(_FILTER_KEYS) - {"stats", "shape"})
            raise SelectionError(f"unknown filter key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                                 f"valid keys: {', '.join(valid)}")

    def group_by(self, *keys: str) -> dict[tuple, "Dump"]:
        """One pass: {(value of each key): sub-dump}, in order of first appearance."""
        buckets: dict[tuple, tuple[list, list]] = {}
        for meta, path in zip(self._metas, self._paths):
            bucket = buckets.setdefault(tuple(meta.get(k) for k in keys), ([], []))
            bucket[0].append(meta)
            bucket[1].append(path)
        return {key: Dump(metas, paths, self._source) for key, (metas, paths) in buckets.items()}

    def _resolve_layers(self, layer):
        if layer is None:
            return None
        layers = self.layers
        values = [layer] if isinstance(layer, int) else (list(layer) if not isinstance(layer, str) else None)
        if values is None:
            return layer
        out = []
        for v in values:
            if v < 0:
                if -v > len(layers):
                    raise SelectionError(f"layer {v}: the dump has only {len(layers)} layers ({span(layers)})")
                v = layers[v]
            out.append(v)
        return out

    def __getitem__(self, key):
        """d["lse"], d["lse", 78], d["lse", -1], d[0] (the first record)."""
        if isinstance(key, int):
            return Record(self._metas[key], self, self._paths[key])
        if isinstance(key, str):
            return self.select(point=key)
        if isinstance(key, tuple) and 1 <= len(key) <= 2:
            return self.select(point=key[0], layer=key[1] if len(key) > 1 else None)
        raise KeyError(f"index a Dump by point, (point, layer) or record number, not {key!r}")

    def __len__(self) -> int:
        return len(self._metas)

    def __iter__(self) -> Iterator[Record]:
        return self.iter()

    def iter(self, point=None, **filters) -> Iterator[Record]:
        """Records one by one, in capture order; tensors are read only when asked for."""
        sub = self.select(point=point, **filters) if (point is not None or filters) else self
        for meta, path in zip(sub._metas, sub._paths):
            yield Record(meta, self, path)

    def record(self, point=None, **filters) -> Record:
        """The one record matching the filters; SelectionError says how to narrow a wider match."""
        sub = self.select(point=point, **filters)
        if len(sub) == 1:
            return sub[0]
        asked = _describe(point, filters)
        if not sub:
            raise SelectionError(f"no record matches {asked}; the dump has points {', '.join(self.points)}, "
                                 f"steps {span(self.steps)}, layers {span(self.layers)}, ranks {span(self.ranks)}")
        hints = []
        for key in ("rank", "step", "layer", "role", "spec_pos", "point"):
            values = sub._values(key)
            if len(values) > 1:
                hints.append(f"{key}= ({', '.join(map(str, values[:8]))}{', ...' if len(values) > 8 else ''})")
        raise SelectionError(f"{len(sub)} records match {asked}; narrow with {' or '.join(hints) or 'file'}")

    def get(self, point=None, **filters):
        """One tensor, exact dtype. Filters: step, layer, role, rank, spec_pos, any metadata key."""
        return self.record(point, **filters).tensor()

    def stack(self, point=None, over: str = "rank", **filters):
        """Stack the tensors of one point over ranks (or steps, ...): [N, ...], ordered by `over`."""
        import torch

        sub = self.select(point=point, **filters)
        by_value: dict = {}
        for rec in sub.iter():
            value = rec.meta.get(over)
            if value in by_value:
                raise SelectionError(f"several records of {_describe(point, filters)} have {over}={value}; "
                                     f"narrow the selection (e.g. step=, layer=, role=)")
            by_value[value] = rec
        if not by_value:
            raise SelectionError(f"no record matches {_describe(point, filters)}")
        keys = sorted(by_value, key=_sort_key)
        shapes = {k: by_value[k].shape for k in keys}
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"{over} {k}: {list(s)}" for k, s in shapes.items())
            raise SelectionError(f"cannot stack {_describe(point, filters)} over {over}: shapes differ ({listing})")
        return torch.stack([by_value[k].tensor() for k in keys])

    # -- display ---------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {
            "records": len(self),
            "ranks": self.ranks,
            "steps": self.steps,
            "layers": self.layers,
            "roles": self.roles,
            "points": self.points,
            "bytes": self.nbytes,
            "segments": len(self.segments),
            "truncated_segments": [{"file": s.path, "records": s.records, "why": s.truncation, "live": s.live}
                                   for s in self.truncated],
            "dropped": self.dropped,
            "capture_errors": self.capture_errors,
            "runs": [r.to_json() for r in self.selected_runs],
            "losses": [{k: (None if v is None or v != v else v) for k, v in row.items()}
                       for row in self.losses.astype(object).to_dict(orient="records")],
            "excluded_phases": self.excluded_phases,
            "problems": self.warnings,
        }

    def __repr__(self) -> str:
        crashed = len(self.truncated) - len(self.live)
        extra = f", {crashed} truncated segment(s)" if crashed else ""
        extra += f", {len(self.live)} still being written" if self.live else ""
        extra += f", {len(self.problems)} record(s) set aside" if self.problems else ""
        return (f"<Dump {len(self.ranks)} ranks, {len(self.steps)} steps, {len(self.layers)} layers, "
                f"{len(self.points)} points, {human_bytes(self.nbytes)}{extra}>")

    def _repr_html_(self) -> str:
        rows = []
        for point in self.points:
            sub = self.select(point=point)
            rows.append(f"<tr><td>{html.escape(point)}</td><td>{len(sub)}</td><td>{span(sub.ranks)}</td>"
                        f"<td>{span(sub.steps)}</td><td>{span(sub.layers)}</td>"
                        f"<td>{html.escape(', '.join(sub.roles))}</td><td>{human_bytes(sub.nbytes)}</td></tr>")
        head = "<tr><th>point</th><th>records</th><th>ranks</th><th>steps</th><th>layers</th><th>roles</th><th>bytes</th></tr>"
        return f"<p>{html.escape(repr(self))}</p><table>{head}{''.join(rows)}</table>"


def execution_order(metas: list[dict], process_starts: list[int]) -> list[int]:
    """Record indices in execution order, without trusting clocks across hosts: forwards (step, layer,
    role, spec_pos) in the order the lowest rank ran them (by its record counter), then rank, then
    the record counter. `process_starts` tells restarted processes of one rank apart."""
    def forward(m):
        return (m.get("step"), m.get("layer"), m.get("role"), m.get("spec_pos"))

    by_rank = sorted(range(len(metas)), key=lambda i: (metas[i].get("rank", 0), process_starts[i], metas[i].get("seq", 0)))
    first_seen: dict = {}
    for i in by_rank:
        first_seen.setdefault(forward(metas[i]), len(first_seen))
    return sorted(by_rank, key=lambda i: first_seen[forward(metas[i])])


def _phases(phases) -> frozenset | None:
    """The phases to keep (None: all), checked against the vocabulary."""
    if phases is None or phases == "all":
        return None
    wanted = (phases,) if isinstance(phases, str) else tuple(phases)
    unknown = [p for p in wanted if p not in PHASES]
    if unknown:
        raise SelectionError(f"unknown phase {unknown[0]!r}; valid phases: {', '.join(PHASES)}, or 'all'")
    return frozenset(wanted)


def _sort_key(value):
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def _describe(point, filters: dict) -> str:
    parts = [repr(point)] if point is not None else []
    parts += [f"{k}={v}" for k, v in filters.items() if v is not None]
    return " ".join(parts) or "the selection"


