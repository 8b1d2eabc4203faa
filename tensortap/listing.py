"""What `tensortap ls` says about a dump beyond its records: per-rank writer totals (every loss), runs,
segments that are truncated or still being written, phases left out, and records set aside.

Everything read from a file (paths, run ids, error notes) is printed as plain text (rich `Text`),
never as console markup: a file named `x[/]y` prints as itself.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from tensortap.format.schema import LOSS_TOTALS

# The totals that mean something was not captured (records_total and bytes_total are what was written).
LOSSES = tuple(k for k in LOSS_TOTALS if k not in ("records_total", "bytes_total"))
MAX_PROBLEM_LINES = 10


def short(total: str) -> str:
    return total.removesuffix("_total")


def per_rank(d) -> list[dict]:
    """One entry per rank: what it holds, and its writer's totals (None where no segment recorded them)."""
    losses = {}
    for row in d.losses.astype(object).to_dict(orient="records"):
        entry = losses.setdefault(row["rank"], {})
        for name in LOSS_TOTALS:
            value = row[name]
            if value is not None and value == value:  # not NA
                entry[name] = entry.get(name, 0) + int(value)
    rows = []
    for rank in d.ranks:
        sub = d.select(rank=rank)
        totals = losses.get(rank, {})
        row = {"rank": rank, "records": len(sub), "steps": sub.steps, "layers": sub.layers, "roles": sub.roles,
               "points": sub.points, "bytes": sub.nbytes,
               "segments": sum(1 for s in d.segments if s.root.get("rank") == rank)}
        row.update({short(name): totals.get(name) for name in LOSSES})
        row.update(records_total=totals.get("records_total"), bytes_total=totals.get("bytes_total"))
        row["dropped"] = max(row["dropped"] or 0, d.dropped.get(rank, 0))
        rows.append(row)
    return rows


def print_notes(d, rows: list[dict], console: Console) -> None:
    """The lines under the `ls` table: losses, runs, truncated and live segments, phases, capture errors."""
    for row in rows:
        lost = [f"{short(k)} {row[short(k)]}" for k in LOSSES if row.get(short(k))]
        if lost:
            written = f"; the writer wrote {row['records_total']} records" if row.get("records_total") is not None else ""
            console.print(Text("losses ", style="yellow") + Text(f"rank {row['rank']}: {', '.join(lost)}{written}"))
    if len(d.selected_runs) > 1:
        for run in d.selected_runs:
            console.print(Text("run ", style="cyan") + Text(run.describe()))
    for seg in d.truncated:
        label = "still being written " if seg.live else "truncated "
        console.print(Text(label, style="cyan" if seg.live else "yellow")
                      + Text(f"{seg.path}: {seg.records} record(s) readable; {seg.truncation}"))
    for phase, n in sorted(d.excluded_phases.items()):
        console.print(Text("excluded ", style="cyan") + Text(f"{n} {phase} record(s) (engine start-up forwards); "
                                                             f"--all-phases shows them"))
    for line in d.capture_errors:
        console.print(Text("capture error ", style="red") + Text(line))


def print_problems(console: Console, *dumps) -> bool:
    """One line per record set aside for malformed metadata (at most MAX_PROBLEM_LINES, then a count).
    True when there was any: the command then exits with code 2 after its output."""
    lines = [line for d in dumps if d is not None for line in d.warnings]
    for line in lines[:MAX_PROBLEM_LINES]:
        console.print(Text("warning: ", style="yellow") + Text(f"{line} (record set aside)"))
    if len(lines) > MAX_PROBLEM_LINES:
        console.print(Text(f"warning: {len(lines) - MAX_PROBLEM_LINES} more record(s) set aside for malformed "
                           f"metadata"))
    return bool(lines)
