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
from rich.text import Text

from tensortap import __version__
from tensortap.cli_options import click_errors, LAYER, RANK, ROLE, SPEC_POS, STEP, Command, Group, Selection, check_output, usage_error
from tensortap.errors import TapError
from tensortap.vocab import DEFAULT_PHASES, HEAD_POINTS, POINTS, ROLES

app = typer.Typer(
    cls=Group,
    rich_markup_mode=None,  # plain help: paragraphs re-wrapped to the terminal, example blocks kept as written
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Capture, check and diff per-rank tensors of distributed MLA attention.\n\n"
         "\b\nStart here:\n  tensortap demo                     reproduce the bug on 4 CPU ranks\n"
         "  tensortap check DUMP               name what went wrong\n"
         "  tensortap report DUMP -o r.html    the same as one HTML page",
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        out.print(f"tensortap {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Capture, check and diff per-rank tensors of distributed MLA attention."""


def _guarded(command):
    """Turn every expected error into one line on stderr and exit code 2; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TapError as exc:  # names from files: plain text, never console markup
            err.print(Text("error: ", style="red") + Text(" ".join(str(exc).split())))
            raise typer.Exit(2)
        except (typer.Exit, typer.Abort, click_errors.ClickException, KeyboardInterrupt):
            raise  # usage errors: the app prints them as one line
        except Exception as exc:  # a bug of ours: still one line, the traceback on request
            if os.environ.get("TENSORTAP_DEBUG"):
                raise
            err.print(Text("error: ", style="red")
                      + Text(f"{' '.join(f'{type(exc).__name__}: {exc}'.split())} (set TENSORTAP_DEBUG=1 for the traceback)"))
            raise typer.Exit(2)

    return wrapper


def _print_json(value) -> None:
    from tensortap.text import as_json as jsonable

    sys.stdout.write(json.dumps(jsonable(value), indent=2) + "\n")


def _open(paths: List[Path], run: Optional[str] = None, all_phases: bool = False):
    import tensortap

    return tensortap.open([str(p) for p in paths], run=run, phases="all" if all_phases else DEFAULT_PHASES)


RUN = typer.Option(None, "--run", help="The run to read when the dump holds several (see ls), or 'all'.")
ALL_PHASES = typer.Option(False, "--all-phases", help="Keep warmup and CUDA-graph capture records too.")


# -- ls ----------------------------------------------------------------------------------------------
@app.command("ls", cls=Command)
@_guarded
def ls_command(
    dumps: List[Path] = typer.Argument(..., metavar="DUMP", help="Dump directories or segment files."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
    run: Optional[str] = RUN,
    all_phases: bool = ALL_PHASES,
):
    """List what a dump holds: ranks, steps, layers, roles, points, bytes, every loss the writers counted
    (dropped, over_budget, lost, errors, graph_skipped), truncated and live segments, runs.

    \b
    Examples:
      tensortap ls tensortap-demo/bug-20261201-221530
      tensortap ls /scratch/tap --run 3f9c2a1b      (one of several runs)
      tensortap ls /scratch/tap --json | jq .per_rank
    """
    from tensortap.listing import per_rank as rank_rows, print_notes, print_problems
    from tensortap.text import span
    from tensortap.text import human_bytes

    d = _open(dumps, run, all_phases)
    summary = d.summary()
    per_rank = rank_rows(d)
    if as_json:
        _print_json({**summary, "per_rank": per_rank})
        raise typer.Exit(2 if print_problems(err, d) else 0)
    out.print(Text(repr(d)))
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("rank", "records", "steps", "layers", "roles", "points", "bytes", "dropped"):
        table.add_column(col, justify="right" if col in ("rank", "records", "bytes", "dropped") else "left",
                         overflow="fold")  # wrap, never cut
    points = list(d.points)  # printed in full on their own line; a rank that lacks some lists its own
    out.print(Text(f"points ({len(points)}): {', '.join(points)}"))
    for row in per_rank:
        mine = "all" if list(row["points"]) == points else ", ".join(row["points"]) or "-"
        table.add_row(str(row["rank"]), str(row["records"]), span(row["steps"]), span(row["layers"]),
                      ",".join(row["roles"]) or "-", mine, human_bytes(row["bytes"]),
                      str(row["dropped"]))
    out.print(table)
    print_notes(d, per_rank, out)
    raise typer.Exit(2 if print_problems(err, d) else 0)


# -- show --------------------------------------------------------------------------------------------
@app.command("show", cls=Command)
@_guarded
def show_command(
    dump: Path = typer.Argument(..., metavar="DUMP", help="Dump directory or segment file."),
    point: str = typer.Argument(..., metavar="POINT", help="Point (lse) or full name (layers.78.attn.lse)."),
    step: Optional[int] = STEP,
    layer: Optional[int] = LAYER,
    role: Optional[str] = ROLE,
    rank: Optional[int] = RANK,
    spec_pos: Optional[int] = SPEC_POS,
    edge: int = typer.Option(3, help="Leading and trailing entries shown per dimension."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output on stdout."),
    run: Optional[str] = RUN,
    all_phases: bool = ALL_PHASES,
):
    """Show one record's metadata, capture stats and a slice of its tensor (or list the matches).

    \b
    Examples:
      tensortap show DUMP lse --step 0 --role draft --spec-pos 0 --rank 1
      tensortap show DUMP layers.77.attn.hidden --step 1 --rank 2 --json
      tensortap show DUMP topk --role draft      (lists the matches)
    """
    import torch

    from tensortap.listing import print_problems

    d = _open([dump], run, all_phases)
    selection = Selection(step=step, layer=layer, role=role, rank=rank, spec_pos=spec_pos)
    sub = selection.apply(d, point)
    if len(sub) != 1:
        _show_matches(sub, selection, as_json)
        raise typer.Exit(2 if print_problems(err, d) else 0)
    rec = sub[0]
    meta = {k: v for k, v in rec.meta.items() if k != "stats"}
    tensor = rec.tensor() if rec.stored else None
    sliced = _edge_slice(tensor, edge) if tensor is not None else None
    if as_json:
        _print_json({"meta": meta, "stats": rec.stats, "slice": sliced, "file": rec.path})
        raise typer.Exit(2 if print_problems(err, d) else 0)
    out.print(Text(repr(rec)))
    out.print(Text(f"file: {rec.path}"))
    for key, value in meta.items():
        out.print(Text(f"  {key}: {value}"))
    out.print(Text("stats: " + ", ".join(f"{k}={v}" for k, v in rec.stats.items())))
    if tensor is not None:
        with_float = tensor.float() if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else tensor
        torch.set_printoptions(edgeitems=edge, threshold=64, linewidth=120)
        out.print(str(with_float), markup=False)
    raise typer.Exit(2 if print_problems(err, d) else 0)


def _edge_slice(tensor, edge: int):
    """The first `edge` entries along every dimension, as nested lists of floats/ints."""
    import torch

    index = tuple(slice(0, edge) for _ in range(tensor.dim()))
    part = tensor[index]
    if part.dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2):
        part = part.float()
    return part.tolist()


def _show_matches(sub, selection: Selection, as_json: bool) -> None:
    cols = ["name", "step", "role", "rank", "spec_pos", "shape", "dtype", "nonfinite", "zero_heads", "empty_rows"]
    frame = sub.records
    cols = [c for c in cols if c in frame.columns]
    if as_json:
        _print_json({"matches": frame[cols].to_dict(orient="records")})
        return
    given = {key for _, key, _ in selection.given()}
    narrow = [f"--{key.replace('_', '-')}" for key in ("step", "layer", "role", "rank", "spec_pos")
              if key not in given and key in frame.columns and frame[key].nunique(dropna=False) > 1] if len(frame) else []
    title = f"{len(sub)} records match" + (f"; narrow with {', '.join(narrow)} to see one" if narrow else "")
    table = Table(box=None, pad_edge=False, header_style="bold", title=title)
    for col in cols:
        table.add_column(col)
    for row in frame[cols].itertuples(index=False):
        table.add_row(*[Text(_cell(v)) for v in row])
    out.print(table)


def _cell(value) -> str:
    import math

    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# -- check -------------------------------------------------------------------------------------------
@app.command("check", cls=Command)
@_guarded
def check_command(
    dumps: List[Path] = typer.Argument(..., metavar="DUMP", help="Dump directories or segment files (one run)."),
    as_json: bool = typer.Option(False, "--json", help="Every finding and verdict as JSON on stdout."),
    oracle: bool = typer.Option(True, "--oracle/--no-oracle", help="Recompute attention in float64 from the dump."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when a forward is unverified for a reason a bug could cause."),
    run: Optional[str] = RUN,
    all_phases: bool = ALL_PHASES,
    step: Optional[int] = STEP,
    layer: Optional[int] = LAYER,
    role: Optional[str] = ROLE,
    rank: Optional[int] = RANK,
    spec_pos: Optional[int] = SPEC_POS,
):
    """Find pre-all-reduce rank divergence and name the laundered-consensus bug.

    Exit code 0 when clean, 1 with findings (or, with --strict, unverified forwards), 2 on errors.
    Per detector, what it verified and what it skipped and why is listed under "coverage".

    \b
    Examples:
      tensortap check tensortap-demo/bug-20261201-221530
      tensortap check /scratch/tap --no-oracle     (no float64 recompute)
      tensortap check /scratch/tap --json | jq '.verdicts'
    """
    from tensortap.analysis import check
    from tensortap.analysis.render import render
    from tensortap.listing import print_problems

    d = _open(dumps, run, all_phases)
    d = Selection(step=step, layer=layer, role=role, rank=rank, spec_pos=spec_pos).apply(d)
    report = check(d, use_oracle=oracle, progress=_progress("checking"))
    code = 2 if d.problems else report.exit(strict)  # records set aside: the check is incomplete
    if as_json:
        _print_json(dict(report.to_json(), strict=strict, exit_code=code, problems=d.warnings))
    else:
        render(report, out)
    print_problems(err, d)
    raise typer.Exit(code)


# -- diff --------------------------------------------------------------------------------------------
@app.command("diff", cls=Command)
@_guarded
def diff_command(
    a: Path = typer.Argument(..., metavar="A", help="Dump A (directory or segment file)."),
    b: Optional[Path] = typer.Argument(None, metavar="B", help="Dump B (not with --across-ranks)."),
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
    run: Optional[str] = typer.Option(None, "--run", help="The run to read from each dump that holds several."),
    run_a: Optional[str] = typer.Option(None, "--run-a", help="The run of A (default: --run)."),
    run_b: Optional[str] = typer.Option(None, "--run-b", help="The run of B (default: --run)."),
    all_phases: bool = ALL_PHASES,
    step: Optional[int] = STEP,
    layer: Optional[int] = LAYER,
    role: Optional[str] = ROLE,
    rank: Optional[int] = RANK,
    spec_pos: Optional[int] = SPEC_POS,
):
    """First divergence between two dumps (runs, roles, layouts), or agreement across ranks of one.

    Exit code 0 when equal within tolerance, 1 when different, 2 on errors.

    \b
    Examples:
      tensortap diff run-a run-b
      tensortap diff DUMP DUMP --role-a draft --role-b target
      tensortap diff dcp4-run dcp1-run --points q,merged_out,hidden
      tensortap diff DUMP --across-ranks
    """
    from tensortap.diffing import across_ranks as check_across, diff, summarize_agreement
    from tensortap.diffing.render import render_agreement, render_diff
    from tensortap.listing import print_problems

    selection = Selection(step=step, layer=layer, role=role, rank=rank, spec_pos=spec_pos)
    if across_ranks:
        if b is not None:
            raise usage_error(f"--across-ranks takes one dump; drop {b} or drop --across-ranks")
        dump_a = selection.apply(_open([a], run_a or run, all_phases))
        rows = check_across(dump_a)
        if as_json:
            _print_json({"agreement": [r.to_json() for r in rows], "summary": summarize_agreement(rows)})
        else:
            render_agreement(rows, out)
        raise typer.Exit(2 if print_problems(err, dump_a) else 1 if any(r.disagree for r in rows) else 0)
    if b is None:
        raise usage_error(f"missing dump B: give two dumps (tensortap diff {a} B), or one with --across-ranks")
    for option, value in (("--role-a", role_a), ("--role-b", role_b)):
        if value is not None and value not in ROLES:
            raise usage_error(f"{option} {value!r} is not a role; choose from {', '.join(ROLES)}")
    point_list = [p.strip() for p in points.split(",") if p.strip()] if points else None
    unknown = [p for p in point_list or () if p not in POINTS]
    if unknown:
        raise usage_error(f"--points: {', '.join(map(repr, unknown))} not a tap point; choose from {', '.join(POINTS)}")
    dump_a, dump_b = _open([a], run_a or run, all_phases), _open([b], run_b or run, all_phases)
    dump_a, dump_b = selection.apply(dump_a, where="A"), selection.apply(dump_b, where="B")
    report = diff(dump_a, dump_b, role_a=role_a, role_b=role_b, layer_a=layer_a, layer_b=layer_b, steps=steps,
                  points=point_list, rtol=rtol, atol=atol)
    if as_json:
        _print_json(report.to_json())
    else:
        render_diff(report, out)
    raise typer.Exit(2 if print_problems(err, dump_a, dump_b) else report.exit_code)


def _progress(label: str):
    """A progress bar over forwards on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None

    def wrap(items):
        from rich.progress import track

        return track(items, description=label, console=err, transient=True)

    return wrap


# -- plot and report ---------------------------------------------------------------------------------
@app.command("plot", cls=Command)
@_guarded
def plot_command(
    dumps: List[Path] = typer.Argument(..., metavar="DUMP", help="Dump(s): several are drawn side by side."),
    output: Path = typer.Option(..., "-o", "--output", help="Image file to write (.png, .svg, .pdf)."),
    point: str = typer.Option("merged_out", help=f"Point of the per-head panel: {', '.join(HEAD_POINTS)}."),
    step: Optional[int] = STEP,
    layer: Optional[int] = LAYER,
    role: Optional[str] = ROLE,
    rank: Optional[int] = RANK,
    spec_pos: Optional[int] = SPEC_POS,
    share_scale: bool = typer.Option(True, "--share-scale/--own-scale",
                                     help="Several dumps: the same y-scale in every row."),
):
    """Plot one forward: per-head output norms by rank, o_proj shares, hidden agreement.

    Draws from the tensors, or from the capture stats of a mode=stats dump.

    \b
    Examples:
      tensortap plot DUMP -o draft.png --step 0 --role draft --spec-pos 0
      tensortap plot bug fixed -o both.png --step 0 --role draft --spec-pos 0
      tensortap plot DUMP -o q.svg --point q --step 1 --role target
    """
    if point not in HEAD_POINTS:
        raise usage_error(f"--point {point!r}: the per-head panel draws [T, H, D] points; choose from "
                          f"{', '.join(HEAD_POINTS)}")
    check_output(output, (".png", ".svg", ".pdf"))
    selection = Selection(step=step, layer=layer, role=role, rank=rank, spec_pos=spec_pos)
    picked = [(str(path), selection.apply(_open([path]))) for path in dumps]
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from tensortap import plot

    rows = [(label if len(picked) > 1 else "", plot.read_forward(plot.one_forward(sub), point)) for label, sub in picked]
    fig = plot.draw(rows, share_scale=share_scale)
    fig.savefig(output, dpi=110)
    out.print(Text(f"wrote {output}"))


@app.command("report", cls=Command)
@_guarded
def report_command(
    dump: Path = typer.Argument(..., metavar="DUMP", help="Dump directory or segment file."),
    output: Path = typer.Option(..., "-o", "--output", help="HTML file to write."),
    oracle: bool = typer.Option(True, "--oracle/--no-oracle", help="Recompute attention in float64 from the dump."),
):
    """Write a self-contained HTML report: what the dump holds, the check, and a figure per verdict.

    One offline file (styles and figures inline). Exit code: check's (0 clean, 1 findings).

    \b
    Examples:
      tensortap report DUMP -o report.html
      tensortap report DUMP -o report.html --no-oracle
    """
    from tensortap.report import write_report

    check_output(output, (".html", ".htm"))
    code = write_report(_open([dump]), str(output), use_oracle=oracle, dump_path=str(dump))
    out.print(Text(f"wrote {output}"))
    raise typer.Exit(code)


# -- demo --------------------------------------------------------------------------------------------
@app.command("demo", cls=Command)
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
    cuda_graph: bool = typer.Option(False, "--cuda-graph",
                                    help="Capture each step (target + draft passes) once as a CUDA graph and "
                                         "replay it (needs --device cuda); the tap records inside the graph."),
):
    """Reproduce the laundered-consensus bug on a reference DCP sparse-MLA decode, with the tap on.

    The draft layer's parallel config is built the way vLLM 0.33.0's
    SpeculativeConfig.create_draft_parallel_config builds it: that function does not copy
    decode_context_parallel_size, so the draft layer runs DCP 1 against a DCP-sharded cache.
    (In vLLM 0.33.0 itself, MTP/EAGLE drafts inherit the target's DCP through another path;
    separate draft models and forks that build the draft config with that function do not.)
    --fixed copies the DCP fields. The default run takes 25-80 s on 2 CPU cores.

    \b
    Examples:
      tensortap demo                      (the bug: glm5 sizes, 4 CPU ranks)
      tensortap demo --fixed              (the fix: check comes out clean)
      tensortap demo --preset tiny --steps 1
      tensortap demo --device cuda        (4 GPUs over NCCL)
      tensortap demo --device cuda --cuda-graph   the same, every step a replayed CUDA graph
    """
    from tensortap.cli_demo import check_demo_device, print_demo
    from tensortap.mla.config import PRESETS
    from tensortap.mla.demo import default_out, run_demo
    from tensortap.mla.scenario import Scenario

    if preset not in PRESETS:
        raise usage_error(f"--preset {preset!r} is not a preset; choose from {', '.join(PRESETS)}")
    dcp = dcp or ranks
    if ranks < 1 or dcp < 1 or ranks % dcp or PRESETS[preset].num_heads % ranks:
        raise usage_error(f"--ranks {ranks} must split {PRESETS[preset].num_heads} heads and be a multiple "
                          f"of --dcp {dcp}")
    check_demo_device(device, ranks)
    if cuda_graph and device != "cuda":
        raise usage_error("--cuda-graph needs --device cuda (CUDA graphs run on GPUs)")
    try:
        scenario = Scenario(preset=preset, ranks=ranks, dcp=dcp, interleave=interleave, backend=backend, fixed=fixed,
                            steps=steps, spec_tokens=spec_tokens, cuda_graph=cuda_graph)
        scenario.target_parallel()
    except ValueError as exc:
        raise usage_error(str(exc)) from None
    target = str(out) if out is not None else default_out(fixed)
    if os.path.isdir(target) and any(".tap.h5" in f for f in os.listdir(target)):
        raise usage_error(f"--out {target}: holds a dump already; pass --out with a new directory (or delete this one)")
    err.print(f"running {preset} decode on {ranks} {device} ranks (TP{ranks}/DCP{dcp}, "
              f"draft config {'fixed' if fixed else 'as vLLM 0.33.0 builds it'}), tap -> {target}")
    run = run_demo(scenario, target, device)
    print_demo(run)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
