"""The `check` report for people: verdicts first, their findings under them, repeats across steps collapsed."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Console
from rich.text import Text

from tensortap.analysis.findings import Finding, Report
from tensortap.text import span

STYLE = {"error": "red", "warning": "yellow", "info": "cyan"}


def collapse(findings: list[Finding]) -> list[tuple[Finding, list]]:
    """Findings that differ only in step/spec_pos -> (first finding, [steps]) in order of first appearance."""
    groups: dict[tuple, list[Finding]] = defaultdict(list)
    for f in findings:
        groups[f.place].append(f)
    return [(fs[0], sorted({f.step for f in fs if f.step is not None})) for fs in groups.values()]


def _print_rows(rows: list[tuple[Finding, list]], counts: dict[tuple, int], console: Console) -> None:
    """Each collapsed finding: one line of where, then its message indented."""
    for f, steps in rows:
        where = f"{f.role or '-'} layer {f.layer}" if f.layer is not None else (f.role or "-")
        times = counts[f.place]
        line = Text("  ")
        line.append(f"{f.severity:<7}", style=STYLE.get(f.severity, ""))
        line.append(f"{f.code:<18}", style="bold")
        line.append(f"{where}  steps {span(steps) if steps else '-'}" + (f" ({times}x)" if times > 1 else ""))
        if f.ranks:
            line.append(f"  ranks {span(f.ranks)}")
        if f.heads:
            line.append(f"  heads {span(f.heads)}")
        if f.op:
            line.append(f"  op {f.op}")
        console.print(line)
        console.print(Text("         " + f.message, style="dim" if f.severity == "info" else ""))


def render(report: Report, console: Console) -> None:
    counts: dict[tuple, int] = defaultdict(int)
    for f in report.findings:
        counts[f.place] += 1
    shown: set[tuple] = set()
    for verdict in report.verdicts:
        style = "bold red" if verdict.name == "laundered consensus" else "bold yellow"
        console.print(Text(verdict.name.upper(), style=style), Text(verdict.explanation))
        mine = [f for f in report.findings if (f.layer, f.role) == (verdict.layer, verdict.role)]
        rows = collapse(mine)
        shown.update(f.place for f, _ in rows)
        _print_rows(rows, counts, console)
        console.print()
    rest = collapse([f for f in report.findings if f.place not in shown])
    if rest:
        console.print(Text("findings", style="bold"))
        _print_rows(rest, counts, console)
        console.print()
    for note in report.notes:
        console.print(Text("note ", style="cyan"), Text(note))
    for line in coverage_lines(report):
        console.print(Text("coverage ", style="cyan"), Text(line))
    for error in report.errors:
        console.print(Text("incomplete ", style="bold red"), Text(error))
    if report.errors:
        style = "bold red"
    elif report.clean:
        style = "green" if report.verified else "yellow"
    else:
        style = ""
    console.print(Text(report.status_line(), style=style))


def coverage_lines(report: Report) -> list[str]:
    """Per detector that did not verify every forward: verified / seen, and each reason it skipped.

    A detector that verified every forward it saw (or had nothing to check in them) gets no line."""
    lines = []
    needs_tensors = []
    for code, cov in report.coverage.items():
        if not cov.skipped:
            continue
        reasons = "; ".join(f"{why}: {n}" + (" (a bug could cause this)" if why in cov.gaps else "")
                            for why, n in cov.skipped.items())
        lines.append(f"{code}: verified {cov.verified} of {cov.forwards} forwards; skipped {reasons}")
        if any("needs full tensors" in why for why in cov.skipped):
            needs_tensors.append(code)
    if needs_tensors:
        lines.append(f"needs full tensors (mode=full): {', '.join(needs_tensors)}")
    return lines
