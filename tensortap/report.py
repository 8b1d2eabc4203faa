"""`tensortap report`: one self-contained HTML page (the check's text, a figure per verdict, the dump's index)."""

from __future__ import annotations

import base64
import html
import io

from rich.console import Console

from tensortap.analysis import check
from tensortap.analysis.render import render
from tensortap.dump import Dump


def _figure_html(d: Dump, step, layer, role, spec_pos) -> str:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from tensortap.plot import forward

    fig = forward(d, step=step, layer=layer, role=role, spec_pos=spec_pos)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return f'<img alt="{html.escape(role or "")} layer {layer}" src="data:image/png;base64,' \
           f'{base64.b64encode(buffer.getvalue()).decode()}"/>'


def write_report(d: Dump, path: str, use_oracle: bool = True) -> int:
    """Write the report; returns check's exit code (0 clean, 1 findings)."""
    report = check(d, use_oracle=use_oracle)
    console = Console(record=True, width=120, file=io.StringIO())
    render(report, console)
    figures = []
    for verdict in report.verdicts:
        forwards = [f for f in report.findings if (f.layer, f.role) == (verdict.layer, verdict.role)]
        first = forwards[0]
        figures.append(f"<h3>{html.escape(verdict.name)}: {html.escape(verdict.role or '')} layer {verdict.layer}"
                       f"</h3>{_figure_html(d, first.step, first.layer, first.role, first.spec_pos)}")
    body = console.export_html(inline_styles=True, code_format="<pre>{code}</pre>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>tensortap report</title></head><body>"
            f"<h1>tensortap report</h1>{d._repr_html_()}<h2>check</h2>{body}{''.join(figures)}</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return report.exit_code
