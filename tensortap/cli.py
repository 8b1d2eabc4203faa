"""The `tensortap` command line. Exit codes: 0 clean, 1 findings or differences, 2 usage, I/O or format error.

--json prints machine-readable output on stdout; diagnostics go to stderr.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from tensortap.errors import TapError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Capture, check and diff per-rank tensors of distributed MLA attention.",
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _guarded(command):
    """Turn every expected error into one line on stderr and exit code 2; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TapError as exc:
            err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
            raise typer.Exit(2)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug of ours: still one line, the traceback on request
            if os.environ.get("TENSORTAP_DEBUG"):
                raise
            err.print(f"[red]error:[/red] {type(exc).__name__}: {exc} (set TENSORTAP_DEBUG=1 for the traceback)")
            raise typer.Exit(2)

    return wrapper


def _print_json(value) -> None:
    from tensortap.text import as_json as jsonable

    sys.stdout.write(json.dumps(jsonable(value), indent=2) + "\n")


def _open(paths: List[Path]):
    import tensortap

    return tensortap.open([str(p) for p in paths])


# -- ls ----------------------------------------------------------------------------------------------
@app.command("ls")
@_guarded
def ls_command(
    dumps: List[Path] = typer.Argument(..., help="Dump directories or segment files."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
):
    """List what a dump holds: ranks, steps, layers, roles, points, bytes, dropped and truncated records."""
    from tensortap.text import span
    from tensortap.text import human_bytes

    d = _open(dumps)
    summary = d.summary()
    per_rank = []
    for rank in d.ranks:
        sub = d.select(rank=rank)
        per_rank.append({
            "rank": rank, "records": len(sub), "steps": sub.steps, "layers": sub.layers, "roles": sub.roles,
            "points": sub.points, "bytes": sub.nbytes, "dropped": d.dropped.get(rank, 0),
            "segments": sum(1 for s in d.segments if s.root.get("rank") == rank),
        })
    if as_json:
        _print_json({**summary, "per_rank": per_rank})
        return
    out.print(repr(d))
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("rank", "records", "steps", "layers", "roles", "points", "bytes", "dropped"):
        table.add_column(col, justify="right" if col in ("rank", "records", "bytes", "dropped") else "left")
    for row in per_rank:
        table.add_row(str(row["rank"]), str(row["records"]), span(row["steps"]), span(row["layers"]),
                      ",".join(row["roles"]) or "-", ",".join(row["points"]), human_bytes(row["bytes"]),
                      str(row["dropped"]))
    out.print(table)
    for seg in d.truncated:
        out.print(f"[yellow]truncated[/yellow] {seg.path}: {seg.records} record(s) readable; {seg.truncation}")
    for line in d.capture_errors:
        out.print(f"[red]capture error[/red] {line}")


# -- show --------------------------------------------------------------------------------------------
@app.command("show")
@_guarded
def show_command(
    dump: Path = typer.Argument(..., help="Dump directory or segment file."),
    point: str = typer.Argument(..., help="Point (lse) or full name (layers.78.attn.lse)."),
    step: Optional[int] = typer.Option(None, help="Step."),
    layer: Optional[int] = typer.Option(None, help="Layer (negative counts from the last)."),
    role: Optional[str] = typer.Option(None, help="target or draft."),
    rank: Optional[int] = typer.Option(None, help="Global rank."),
    edge: int = typer.Option(3, help="Leading and trailing entries shown per dimension."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
):
    """Show one record's metadata, capture stats and a slice of its tensor (or list the matches)."""
    import torch

    d = _open([dump])
    sub = d.select(point=point, step=step, layer=layer, role=role, rank=rank)
    if len(sub) != 1:
        if not len(sub):
            d.record(point, step=step, layer=layer, role=role, rank=rank)  # raises with a useful hint
        _show_matches(sub, as_json)
        return
    rec = sub[0]
    meta = {k: v for k, v in rec.meta.items() if k != "stats"}
    tensor = rec.tensor() if rec.stored else None
    sliced = _edge_slice(tensor, edge) if tensor is not None else None
    if as_json:
        _print_json({"meta": meta, "stats": rec.stats, "slice": sliced, "file": rec.path})
        return
    out.print(repr(rec))
    out.print(f"file: {rec.path}")
    for key, value in meta.items():
        out.print(f"  {key}: {value}")
    out.print("stats: " + ", ".join(f"{k}={v}" for k, v in rec.stats.items()))
    if tensor is not None:
        with_float = tensor.float() if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else tensor
        torch.set_printoptions(edgeitems=edge, threshold=64, linewidth=120)
        out.print(str(with_float), markup=False)


def _edge_slice(tensor, edge: int):
    """The first `edge` entries along every dimension, as nested lists of floats/ints."""
    import torch

    index = tuple(slice(0, edge) for _ in range(tensor.dim()))
    part = tensor[index]
    if part.dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2):
        part = part.float()
    return part.tolist()


def _show_matches(sub, as_json: bool) -> None:
    cols = ["name", "step", "role", "rank", "spec_pos", "shape", "dtype", "nonfinite", "zero_heads", "empty_rows"]
    frame = sub.records
    cols = [c for c in cols if c in frame.columns]
    if as_json:
        _print_json({"matches": frame[cols].to_dict(orient="records")})
        return
    table = Table(box=None, pad_edge=False, header_style="bold", title=f"{len(sub)} records match; narrow with "
                  "--step/--layer/--role/--rank to see one")
    for col in cols:
        table.add_column(col)
    for row in frame[cols].itertuples(index=False):
        table.add_row(*[_cell(v) for v in row])
    out.print(table)


def _cell(value) -> str:
    import math

    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# -- check -------------------------------------------------------------------------------------------
@app.command("check")
@_guarded
def check_command(
    dumps: List[Path] = typer.Argument(..., help="Dump directories or segment files (one run)."),
    as_json: bool = typer.Option(False, "--json", help="Every finding and verdict as JSON on stdout."),
    oracle: bool = typer.Option(True, "--oracle/--no-oracle", help="Recompute attention in float64 from the dump."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when a forward is unverified for a reason a bug could cause."),
):
    """Find pre-all-reduce rank divergence and name the laundered-consensus bug.

    Exit code 0 when clean, 1 with findings, 2 on errors.
    """
    from tensortap.analysis import check
    from tensortap.analysis.render import render

    d = _open(dumps)
    report = check(d, use_oracle=oracle, progress=_progress("checking"))
    if as_json:
        _print_json(dict(report.to_json(), strict=strict, exit_code=report.exit(strict)))
    else:
        render(report, out)
    raise typer.Exit(report.exit(strict))


# -- diff --------------------------------------------------------------------------------------------
@app.command("diff")
@_guarded
def diff_command(
    a: Path = typer.Argument(..., help="Dump A (directory or segment file)."),
    b: Optional[Path] = typer.Argument(None, help="Dump B (not with --across-ranks)."),
    across_ranks: bool = typer.Option(False, "--across-ranks", help="One dump: what must agree across ranks."),
    role_a: Optional[str] = typer.Option(None, help="Compare this role of A ..."),
    role_b: Optional[str] = typer.Option(None, help="... with this role of B (draft vs target)."),
    layer_a: Optional[int] = typer.Option(None, help="Compare this layer of A ..."),
    layer_b: Optional[int] = typer.Option(None, help="... with this layer of B."),
    steps: Optional[str] = typer.Option(None, help="Steps, e.g. 0-9,12."),
    points: Optional[str] = typer.Option(None, help="Points, e.g. q,merged_out,hidden."),
    rtol: Optional[float] = typer.Option(None, help="Relative tolerance (default: per dtype)."),
    atol: Optional[float] = typer.Option(None, help="Absolute tolerance (default: per dtype)."),
    as_json: bool = typer.Option(False, "--json", help="Every pair and the summary as JSON on stdout."),
):
    """First divergence between two dumps (runs, roles, layouts), or agreement across ranks of one.

    Exit code 0 when equal within tolerance, 1 when different, 2 on errors.
    """
    import tensortap
    from tensortap.diffing import across_ranks as check_across, diff, summarize_agreement
    from tensortap.diffing.render import render_agreement, render_diff

    if across_ranks:
        if b is not None:
            raise typer.BadParameter("--across-ranks takes one dump", param_hint="B")
        rows = check_across(tensortap.open(str(a)))
        if as_json:
            _print_json({"agreement": [r.to_json() for r in rows], "summary": summarize_agreement(rows)})
        else:
            render_agreement(rows, out)
        raise typer.Exit(1 if any(r.disagree for r in rows) else 0)
    if b is None:
        raise typer.BadParameter("give two dumps, or one with --across-ranks", param_hint="B")
    point_list = [p.strip() for p in points.split(",")] if points else None
    report = diff(str(a), str(b), role_a=role_a, role_b=role_b, layer_a=layer_a, layer_b=layer_b, steps=steps,
                  points=point_list, rtol=rtol, atol=atol)
    if as_json:
        _print_json(report.to_json())
    else:
        render_diff(report, out)
    raise typer.Exit(report.exit_code)


def _progress(label: str):
    """A progress bar over forwards on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None

    def wrap(items):
        from rich.progress import track

        return track(items, description=label, console=err, transient=True)

    return wrap


# -- plot and report ---------------------------------------------------------------------------------
@app.command("plot")
@_guarded
def plot_command(
    dump: Path = typer.Argument(..., help="Dump directory or segment file."),
    output: Path = typer.Option(..., "-o", "--output", help="Image file to write (.png, .svg, .pdf)."),
    point: str = typer.Option("merged_out", help="Head-shaped point for the per-head panel."),
    step: Optional[int] = typer.Option(None, help="Step."),
    layer: Optional[int] = typer.Option(None, help="Layer (negative counts from the last)."),
    role: Optional[str] = typer.Option(None, help="target or draft."),
    spec_pos: Optional[int] = typer.Option(None, help="Draft pass."),
):
    """Plot one forward: per-head output norms by rank, o_proj shares, hidden agreement."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from tensortap.plot import forward

    fig = forward(_open([dump]), step=step, layer=layer, role=role, spec_pos=spec_pos, point=point)
    fig.savefig(output, dpi=110)
    out.print(f"wrote {output}")


@app.command("report")
@_guarded
def report_command(
    dump: Path = typer.Argument(..., help="Dump directory or segment file."),
    output: Path = typer.Option(..., "-o", "--output", help="HTML file to write."),
    oracle: bool = typer.Option(True, "--oracle/--no-oracle", help="Recompute attention in float64 from the dump."),
):
    """Write a self-contained HTML report: what the dump holds, the check, and a figure per verdict."""
    from tensortap.report import write_report

    code = write_report(_open([dump]), str(output), use_oracle=oracle)
    out.print(f"wrote {output}")
    raise typer.Exit(code)


# -- demo --------------------------------------------------------------------------------------------
@app.command("demo")
@_guarded
def demo_command(
    out: Optional[Path] = typer.Option(None, help="Dump directory (new or empty) [default: ./tensortap-demo/<bug|fixed>-<time>]."),
    ranks: int = typer.Option(4, help="Ranks: TP size, and the target's DCP size unless --dcp."),
    dcp: Optional[int] = typer.Option(None, help="The target's DCP size (a divisor of --ranks) [default: --ranks]."),
    fixed: bool = typer.Option(False, "--fixed", help="Copy the DCP fields into the draft config (the fix)."),
    device: str = typer.Option("cpu", help="cpu (gloo ranks) or cuda (one GPU a rank, NCCL)."),
    steps: int = typer.Option(3, help="Decode steps."),
    spec_tokens: int = typer.Option(2, help="Draft (MTP) passes per step."),
    preset: str = typer.Option("glm5", help="Model sizes: glm5 (64 heads, top-k 2048) or tiny."),
    backend: str = typer.Option("ag_rs", help="DCP combine: ag_rs or a2a."),
    interleave: int = typer.Option(1, help="cp_kv_cache_interleave_size."),
):
    """Reproduce the laundered-consensus bug on a reference DCP sparse-MLA decode, with the tap on.

    The draft layer's parallel config comes from vLLM 0.33.0's create_draft_parallel_config,
    which drops decode_context_parallel_size: the draft runs DCP 1 against a DCP-sharded cache.
    """
    from tensortap.mla.config import PRESETS
    from tensortap.mla.demo import default_out, run_demo
    from tensortap.mla.scenario import Scenario

    if preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}", param_hint="--preset")
    dcp = dcp or ranks
    if ranks < 1 or dcp < 1 or ranks % dcp or PRESETS[preset].num_heads % ranks:
        raise typer.BadParameter(f"--ranks {ranks} must split {PRESETS[preset].num_heads} heads and be a multiple "
                                 f"of --dcp {dcp}", param_hint="--ranks")
    try:
        scenario = Scenario(preset=preset, ranks=ranks, dcp=dcp, interleave=interleave, backend=backend, fixed=fixed,
                            steps=steps, spec_tokens=spec_tokens)
        scenario.target_parallel()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    target = str(out) if out is not None else default_out(fixed)
    err.print(f"running {preset} decode on {ranks} {device} ranks (TP{ranks}/DCP{dcp}, "
              f"draft config {'fixed' if fixed else 'as vLLM 0.33.0 builds it'}), tap -> {target}")
    run = run_demo(scenario, target, device)
    _print_demo(run)


def _print_demo(run) -> None:
    import tensortap
    from tensortap.text import human_bytes

    d = tensortap.open(run.out)
    out.print(f"captured {len(d)} records, {human_bytes(d.nbytes)}, from {len(d.ranks)} ranks in {run.seconds:.1f} s: "
              f"{run.out}")
    for role in d.roles:
        sub = d.select(point="merged_out", role=role)
        zero = {}
        for rec in sub:
            zero[rec.rank] = max(zero.get(rec.rank, 0), rec.stats.get("zero_heads", 0))
        heads = {rec.rank: rec.shape[1] for rec in sub}
        listing = ", ".join(f"rank {r}: {zero[r]}/{heads[r]}" for r in sorted(zero))
        out.print(f"  {role}: all-zero attention heads after the merge ({listing})")
    from tensortap.analysis import check

    report = check(d)
    if report.verdicts:
        for verdict in report.verdicts:
            out.print(f"[bold red]{verdict.name.upper()}[/bold red] {verdict.explanation}")
    else:
        out.print(f"check: {'clean' if report.clean else f'{len(report.findings)} findings'}")
    out.print(f"next: tensortap check {run.out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
