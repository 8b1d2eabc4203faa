"""Runs in one dump: which segments belong together, and picking one.

A *writer run* is one configure()..close() of one process: its segments share the root attribute
`run_id` (segments from before run ids: the same host, pid and start time). A *run* is the set of
writer runs of one job: one writer run per rank, running at the same time. Writer runs join a run
when their ranks are disjoint and their capture intervals overlap (within `SLACK_NS`); two writer
runs holding the same rank are two runs (a second configure() in one directory, the bug and the
fixed demo side by side, a restarted server). A run is named by the id of its lowest rank's
writer run; any of its writer runs' ids (or a unique prefix of one) selects it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

from tensortap.errors import SelectionError
from tensortap.format import schema
from tensortap.format.live import parse_name
from tensortap.format.reader import SegmentInfo
from tensortap.text import span

SLACK_NS = 2_000_000_000
ALL = "all"


@dataclass
class Run:
    """One run: its name, its writer runs, ranks, records and when it captured."""

    id: str
    writers: list[str] = field(default_factory=list)
    ranks: set = field(default_factory=set)
    records: int = 0
    start_ns: int = 0
    end_ns: int = 0
    directories: set = field(default_factory=set)

    def describe(self) -> str:
        when = datetime.datetime.fromtimestamp(self.start_ns / 1e9, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        where = ", ".join(sorted(self.directories))
        return f"{self.id} (ranks {span(sorted(self.ranks))}, {self.records} records, started {when} UTC, in {where})"

    def to_json(self) -> dict:
        return {"run": self.id, "writer_runs": self.writers, "ranks": sorted(self.ranks), "records": self.records,
                "start_ns": self.start_ns, "end_ns": self.end_ns, "directories": sorted(self.directories)}


def writer_key(seg: SegmentInfo) -> str:
    """The writer run of a segment: its run_id (root attribute, else its name), else host-pid-start."""
    run_id = seg.root.get("run_id")
    parsed = parse_name(seg.path) or {}
    if run_id or parsed.get("run_id"):
        return str(run_id or parsed["run_id"])
    host = seg.root.get("host", parsed.get("host", "?"))
    pid = seg.root.get("pid", parsed.get("pid", "?"))
    return f"{host}-{pid}-{seg.root.get('start_time_ns', 0)}"


def identify(segments: list[SegmentInfo], metas: list[list[dict]]) -> tuple[list[Run], list[str]]:
    """(the runs, in start order; the run id of each segment), from the segments and their records."""
    writers: dict[str, Run] = {}
    keys = []
    for seg, records in zip(segments, metas):
        key = writer_key(seg)
        if seg.root.get("start_time_ns") is None and not seg.root.get("run_id"):
            key = _orphan_owner(key, seg, writers)  # an unreadable .tmp joins its process's other segments
        keys.append(key)
        w = writers.setdefault(key, Run(key, [key], start_ns=1 << 63))
        ranks = {m["rank"] for m in records}
        if not ranks and isinstance(seg.root.get("rank"), int):
            ranks = {seg.root["rank"]}
        w.ranks |= ranks
        w.records += len(records)
        w.directories.add(os.path.dirname(os.path.abspath(seg.path)))
        times = [m["time_ns"] for m in records if "time_ns" in m]
        times += [seg.root[k] for k in ("start_time_ns", "opened_ns", "closed_ns") if isinstance(seg.root.get(k), int)]
        if times:
            w.start_ns, w.end_ns = min(w.start_ns, min(times)), max(w.end_ns, max(times))
    runs: list[Run] = []
    owner: dict[str, Run] = {}
    for w in sorted(writers.values(), key=lambda w: (w.start_ns, w.id)):
        home = next((r for r in runs if not (r.ranks & w.ranks) and w.start_ns <= r.end_ns + SLACK_NS
                     and r.start_ns <= w.end_ns + SLACK_NS), None)
        if home is None:
            home = Run(w.id, start_ns=w.start_ns, end_ns=w.end_ns)
            runs.append(home)
        home.writers.append(w.id)
        home.ranks |= w.ranks
        home.records += w.records
        home.start_ns, home.end_ns = min(home.start_ns, w.start_ns), max(home.end_ns, w.end_ns)
        home.directories |= w.directories
        owner[w.id] = home
    for run in runs:  # named by its lowest rank's writer run
        run.id = min(run.writers, key=lambda k: (min(writers[k].ranks, default=1 << 30), k))
    return runs, [owner[k].id for k in keys]


def _orphan_owner(key: str, seg: SegmentInfo, writers: dict[str, Run]) -> str:
    prefix = key.rsplit("-", 1)[0] + "-"
    return next((k for k in writers if k.startswith(prefix)), key)


def choose(runs: list[Run], wanted: str | None, where: str) -> set[str] | None:
    """The run ids to keep: every run for 'all', the one asked for, or the only one. Several runs and
    none asked for, or an unknown one: SelectionError listing the runs there are."""
    if wanted == ALL or (wanted is None and len(runs) <= 1):
        return None
    listing = "; ".join(r.describe() for r in runs)
    if wanted is None:
        raise SelectionError(f"{where} holds {len(runs)} runs: {listing}; pick one with --run RUN_ID "
                             f"(tensortap.open(..., run=RUN_ID)), or --run all to read them together")
    matches = [r for r in runs if wanted in r.writers]
    if not matches and len(wanted) >= 4:
        matches = [r for r in runs if any(w.startswith(wanted) for w in r.writers)]
    if len(matches) != 1:
        what = "matches several runs" if matches else "matches no run"
        raise SelectionError(f"run {wanted!r} {what} of {where}; it holds {listing}")
    return {matches[0].id}


def losses(segments: list[SegmentInfo], run_of: dict[str, str]):
    """pandas DataFrame, one row per (run, rank), of the writers' totals (schema.LOSS_TOTALS; <NA> where
    no segment of that writer recorded them). A writer run's totals are the largest any of its segments
    holds (they only grow, flush by flush); the writer runs of one rank in one run are summed."""
    import pandas as pd

    by_writer: dict[tuple, dict] = {}
    for seg in segments:
        rank = seg.root.get("rank")
        if rank is None:
            continue
        totals = by_writer.setdefault((run_of.get(seg.path, ""), writer_key(seg), rank), {})
        for name in schema.LOSS_TOTALS:
            value = seg.root.get(name)
            if value is not None:
                totals[name] = max(totals.get(name, 0), value)
    rows: dict[tuple, dict] = {}
    for (run, _writer, rank), totals in by_writer.items():
        row = rows.setdefault((run, rank), {"run": run, "rank": rank})
        for name, value in totals.items():
            row[name] = row.get(name, 0) + value
    frame = pd.DataFrame([rows[k] for k in sorted(rows, key=lambda k: (str(k[0]), k[1]))],
                         columns=["run", "rank", *schema.LOSS_TOTALS])
    for name in schema.LOSS_TOTALS:
        frame[name] = frame[name].astype("Int64")
    return frame
