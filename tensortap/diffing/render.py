"""`tensortap diff` for people: the first divergence with its context, then a summary per point."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tensortap.diffing.compare import Comparison
from tensortap.diffing import Agreement, DiffReport, summarize_agreement


def _describe(c: Comparison) -> str:
    if c.kind in ("shape", "dtype"):
        return c.note
    if c.kind == "indices":
        return f"{c.over} of {c.total} rows select different tokens (smallest Jaccard {c.jaccard:.3f}); {c.note}"
    if c.kind == "bytes":
        return c.note or "identical bytes"
    return (f"max |a-b| {c.max_abs:.3g} at {c.max_abs_at} (a={c.value_a:.6g}, b={c.value_b:.6g}); "
            f"max rel {c.max_rel:.3g}; rel L2 {c.rel_l2:.3g}; cosine {c.cosine:.6f}; "
            f"{c.over} of {c.total} rows over tolerance")


def _metrics(row: dict) -> list[str]:
    """max abs, max rel, rel L2, cosine, jaccard cells: "shape" where only shapes were compared, "-" where
    a metric does not apply (no jaccard for floats, no value metrics for indices)."""
    def cell(key: str, fmt: str) -> str:
        return "-" if row[key] is None else format(row[key], fmt)

    if row["max_abs"] is None and row["jaccard"] is None and row.get("tokens") is None and row["shape"]:
        return ["shape", "-", "-", "-", "-"]
    cells = [cell("max_abs", ".3g"), cell("max_rel", ".3g"), cell("rel_l2", ".3g"), cell("cosine", ".4f"),
             cell("jaccard", ".3f")]
    if row.get("tokens") is not None and row["max_abs"] is None:
        cells[0] = f"{row['tokens']} tokens"
    return cells


def render_diff(report: DiffReport, console: Console) -> None:
    first, context = report.first, report.context
    if first is None:
        console.print(Text(f"equal within tolerance: {len(report.pairs)} pairs ({report.mode})", style="green"))
    else:
        console.print(Text("first divergence: ", style="bold red") + Text(first.label))
        console.print(Text("  " + _describe(first.comparison)))
        if context is not None:
            console.print(Text(f"  after: {context.label} matched"))
        else:
            console.print(Text("  (the first pair compared)"))
    table = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 1, 0, 0))
    summary = report.summary()
    shapes = any(row["shape"] for row in summary)  # a column of shape mismatches, only when there are some
    for column in ("point", "pairs", "differ") + (("shape",) if shapes else ()) + \
            ("max abs", "max rel", "rel L2", "cosine", "jaccard"):
        if column == "point":
            table.add_column(column, no_wrap=True, min_width=max([len(r["point"]) for r in summary] + [5]))
        else:
            table.add_column(column, justify="right", no_wrap=True)
    for row in summary:
        table.add_row(Text(row["point"]), str(row["pairs"]), str(row["differ"]),
                      *((str(row["shape"]),) if shapes else ()), *_metrics(row))
    console.print(table)
    for point, why in report.not_comparable.items():
        console.print(Text(f"not comparable: {point}: {why}", style="yellow"))
    if report.only_a:
        console.print(Text(f"only in A: {len(report.only_a)} forwards ({', '.join(report.only_a[:4])}"
                           f"{', ...' if len(report.only_a) > 4 else ''})", style="yellow"))
    if report.only_b:
        console.print(Text(f"only in B: {len(report.only_b)} forwards ({', '.join(report.only_b[:4])}"
                           f"{', ...' if len(report.only_b) > 4 else ''})", style="yellow"))


def render_agreement(rows: list[Agreement], console: Console) -> None:
    for s in summarize_agreement(rows):
        if s["disagreeing"]:
            console.print(Text(f"{s['point']}: ranks {s['ranks']} disagree in {s['disagreeing']} of {s['checked']} "
                               f"groups; first at {s['where']}: {s['reason']}", style="red"))
        else:
            console.print(Text(f"{s['point']}: agrees in all {s['checked']} groups", style="green"))
