"""`tensortap report`: one self-contained, offline HTML page about a dump.

Sections: where the dump came from (path, capture time, run identity, library versions), what it
holds (per point), the verdicts (each with its figure), the findings as a table, the notes, and
for a clean dump an overview figure of one forward per role. Styles are inline and figures are
PNG data URIs: the file opens anywhere, with no network.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import os

from tensortap import __version__
from tensortap.analysis import check
from tensortap.analysis.findings import Finding, Report
from tensortap.analysis.render import collapse
from tensortap.dump import Dump
from tensortap.text import span
from tensortap.vocab import FORWARD_KEYS

STYLE = """
body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       max-width: 1200px; margin: 2em auto; padding: 0 1.5em; background: #fff; }
h1 { font-size: 1.8em; margin-bottom: .2em; } h2 { font-size: 1.3em; margin-top: 2em;
     border-bottom: 1px solid #ddd; padding-bottom: .2em; } h3 { font-size: 1.1em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .92em; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: .92em; }
.verdict { border-left: 6px solid #c62828; background: #fdecea; padding: .8em 1em; margin: 1em 0; }
.verdict.divergent { border-color: #ef6c00; background: #fff3e0; }
.verdict .name { font-weight: 700; color: #b71c1c; letter-spacing: .03em; }
.clean { border-left: 6px solid #2e7d32; background: #e8f5e9; padding: .8em 1em; margin: 1em 0; }
.incomplete { border-left: 6px solid #6a1b9a; background: #f3e5f5; padding: .8em 1em; margin: 1em 0; }
.sev-error { color: #b71c1c; font-weight: 600; } .sev-warning { color: #e65100; font-weight: 600; }
.sev-info { color: #01579b; }
img.figure { max-width: 100%; height: auto; border: 1px solid #eee; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1.2em; }
dl.meta dt { color: #555; } dl.meta dd { margin: 0; }
"""


def write_report(d: Dump, path: str, use_oracle: bool = True, dump_path: str | None = None) -> int:
    """Write the report to `path`; returns check's exit code (0 clean, 1 findings, 2 incomplete)."""
    report = check(d, use_oracle=use_oracle)
    page = render_report(d, report, dump_path or _dump_path(d))
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return report.exit_code


def render_report(d: Dump, report: Report, dump_path: str) -> str:
    """The page as one string."""
    e = html.escape
    parts = [f"<h1>tensortap report</h1><p class='mono'>{e(dump_path)}</p>", _provenance(d, dump_path),
             "<h2>What the dump holds</h2>", d._repr_html_(), "<h2>Check</h2>", _summary(report)]
    for verdict in report.verdicts:
        mine = [f for f in report.findings if (f.layer, f.role) == (verdict.layer, verdict.role)]
        kind = "" if verdict.name == "laundered consensus" else " divergent"
        parts.append(f"<div class='verdict{kind}'><span class='name'>{e(verdict.name.upper())}</span> "
                     f"{e(verdict.explanation)}</div>")
        if mine:
            first = mine[0]
            parts.append(_figure(d, dict(step=first.step, layer=first.layer, role=first.role, spec_pos=first.spec_pos),
                                 f"{verdict.name}: {first.role} layer {first.layer} step {first.step}"))
        parts.append(_findings_table(mine))
    shown = {(v.layer, v.role) for v in report.verdicts}
    rest = [f for f in report.findings if (f.layer, f.role) not in shown]
    if rest:
        parts.append("<h3>Other findings</h3>" + _findings_table(rest))
    if report.notes:
        parts.append("<h3>Notes</h3><ul>" + "".join(f"<li>{e(n)}</li>" for n in report.notes) + "</ul>")
    if not report.verdicts:
        parts.append("<h2>Overview</h2>")
        parts.extend(_overview(d))
    body = "".join(parts)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>tensortap report: {e(os.path.basename(dump_path.rstrip('/')) or dump_path)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def _dump_path(d: Dump) -> str:
    dirs = sorted({os.path.dirname(os.path.abspath(s.path)) for s in d.segments})
    return dirs[0] if len(dirs) == 1 else ", ".join(dirs)


def _provenance(d: Dump, dump_path: str) -> str:
    """Where the dump came from: capture time, run identity, versions; and when this page was made."""
    roots = [s.root for s in d.segments]
    starts = [int(r["start_time_ns"]) for r in roots if r.get("start_time_ns")]
    runs = sorted({str(r["run_id"]) for r in roots if r.get("run_id")})
    hosts = sorted({str(r.get("host")) for r in roots if r.get("host")})
    versions = next((r.get("versions") for r in roots if isinstance(r.get("versions"), dict)), {})
    argv = next((r.get("argv") for r in roots if r.get("argv")), None)
    rows = [("dump", dump_path),
            ("captured", _when(min(starts)) if starts else "unknown (no start time in the segments)"),
            ("run", ", ".join(runs) if runs else "no run id (written before tensortap recorded one)"),
            ("hosts, processes", f"{', '.join(hosts) or 'unknown'}; "
                                 f"{len({(r.get('host'), r.get('pid')) for r in roots})} writer process(es), "
                                 f"{len(d.segments)} segment(s)"),
            ("command", " ".join(map(str, argv)) if argv else "unknown"),
            ("written by", ", ".join(f"{k} {v}" for k, v in versions.items()) or "unknown"),
            ("report", f"{_when(datetime.datetime.now(datetime.timezone.utc).timestamp() * 1e9)} "
                       f"by tensortap {__version__}")]
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in rows)
    return f"<dl class='meta'>{items}</dl>"


def _when(ns: float) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _summary(report: Report) -> str:
    errors = sum(1 for f in report.findings if f.severity == "error")
    warnings = sum(1 for f in report.findings if f.severity == "warning")
    if report.errors:
        items = "".join(f"<li>{html.escape(x)}</li>" for x in report.errors)
        return (f"<div class='incomplete'><b>check incomplete</b>: {len(report.errors)} detector run(s) failed"
                f"<ul>{items}</ul></div>")
    if report.verified:
        return f"<div class='clean'><b>clean</b>: no findings in {report.records} records</div>"
    if report.clean:  # no findings, but some forwards could not be verified
        return f"<div class='incomplete'><b>{html.escape(report.status_line())}</b></div>"
    return (f"<p>{len(report.findings)} findings ({errors} errors, {warnings} warnings) in {report.records} records, "
            f"{len(report.verdicts)} verdict(s).</p>")


def _findings_table(findings: list[Finding]) -> str:
    if not findings:
        return ""
    counts: dict[tuple, int] = {}
    for f in findings:
        counts[f.place] = counts.get(f.place, 0) + 1
    e = html.escape
    rows = []
    for f, steps in collapse(findings):
        where = f"{f.role or '-'} layer {f.layer}" if f.layer is not None else (f.role or "-")
        rows.append(f"<tr><td class='sev-{e(f.severity)}'>{e(f.severity)}</td><td><code>{e(f.code)}</code></td>"
                    f"<td>{e(where)}</td><td>{e(span(steps) if steps else '-')}</td>"
                    f"<td>{e(span(f.ranks) if f.ranks else '-')}</td><td>{e(span(f.heads) if f.heads else '-')}</td>"
                    f"<td class='num'>{counts[f.place]}</td><td>{e(f.message)}</td></tr>")
    head = ("<tr><th>severity</th><th>code</th><th>where</th><th>steps</th><th>ranks</th><th>heads</th>"
            "<th>times</th><th>what</th></tr>")
    return f"<table class='findings'>{head}{''.join(rows)}</table>"


def _overview(d: Dump) -> list[str]:
    """One figure per role: its first forward that carries a per-head point."""
    out = []
    for role in d.roles:
        sub = d.select(role=role, point="merged_out")
        if not len(sub):
            continue
        first = sub[0].meta
        where = {k: first.get(k) for k in FORWARD_KEYS}
        out.append(_figure(d, where, f"overview: {role} layer {where['layer']} step {where['step']}"))
    return out or ["<p>No per-head point (q, partial_out, merged_out) in this dump to draw.</p>"]


def _figure(d: Dump, where: dict, caption: str) -> str:
    """A forward's figure as an inline PNG, or a line saying why there is none."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from tensortap import plot
    from tensortap.errors import TapError

    filters = {k: v for k, v in where.items() if v is not None}
    sub = d.select(**filters)
    if where.get("spec_pos") is None:  # a target forward: no draft pass in it
        sub = sub.select(spec_pos=None)
    try:
        fig = plot.draw([("", plot.read_forward(plot.one_forward(sub)))])
    except TapError as exc:
        return f"<p>(no figure for {html.escape(caption)}: {html.escape(str(exc))})</p>"
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return (f"<figure><img class='figure' alt='{html.escape(caption)}' src='data:image/png;base64,{data}'/>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
