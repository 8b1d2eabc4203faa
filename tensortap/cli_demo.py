"""`tensortap demo` on the command line: the device check before any work, and the summary after it."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from tensortap.cli_options import usage_error


def check_demo_device(device: str, ranks: int) -> None:
    """Before any work: the device exists, with a GPU for every rank."""
    if device not in ("cpu", "cuda"):
        raise usage_error(f"--device {device!r}: choose cpu (gloo ranks) or cuda (one GPU a rank)")
    if device == "cuda":
        import torch

        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < ranks:
            fewer = f", or --ranks {found}" if found else ""
            raise usage_error(f"--device cuda needs {ranks} GPUs (one a rank), found {found}; "
                              f"run on CPU ranks with --device cpu{fewer}")


def print_demo(run) -> None:
    """What the run captured, the zero heads per role after the merge, and check's verdicts (stdout)."""
    import tensortap

    out = Console(highlight=False, soft_wrap=True)  # as the cli's: stdout, plain text
    from tensortap.text import human_bytes

    d = tensortap.open(run.out)
    out.print(Text(f"captured {len(d)} records, {human_bytes(d.nbytes)}, from {len(d.ranks)} ranks in {run.seconds:.1f} s: "
                   f"{run.out}"))
    for role in d.roles:
        sub = d.select(point="merged_out", role=role)
        zero = {}
        for rec in sub:
            zero[rec.rank] = max(zero.get(rec.rank, 0), rec.stats.get("zero_heads", 0))
        heads = {rec.rank: rec.shape[1] for rec in sub}
        listing = ", ".join(f"rank {r}: {zero[r]}/{heads[r]}" for r in sorted(zero))
        out.print(Text(f"  {role}: all-zero attention heads after the merge ({listing})"))
    from tensortap.analysis import check

    report = check(d)
    if report.verdicts:
        for verdict in report.verdicts:
            out.print(Text(verdict.name.upper(), style="bold red") + Text(f" {verdict.explanation}"))
    else:
        out.print(f"check: {'clean' if report.clean else f'{len(report.findings)} findings'}")
    out.print(Text(f"next: tensortap check {run.out}"))
