"""tensortap: find silent cross-rank corruption in distributed MLA attention.

Capture (zero cost when TAP is unset):
    with tensortap.scope(step=s, layer=78, role="draft"):
        tensortap.point("layers.78.attn.lse", lse)
Read and analyse:
    d = tensortap.open("/scratch/tap"); tensortap.check(d); tensortap.diff(d1, d2)
"""

__version__ = "0.1.0"

from tensortap.errors import FormatError, SelectionError, TapConfigError, TapError  # noqa: E402

_CAPTURE = ("capturing", "close", "configure", "current_config", "enabled", "flush", "point", "scope", "stats", "wants")


def __getattr__(name: str):
    """The capture API loads on first use (reading TAP then), and binds here: later calls cost a plain
    attribute lookup. Readers and the writer process never import torch through it."""
    if name in _CAPTURE:
        from tensortap.capture import runtime

        for attr in _CAPTURE:
            globals()[attr] = getattr(runtime, attr)
        return globals()[name]
    raise AttributeError(f"module 'tensortap' has no attribute {name!r}")


def open(path, **options):  # noqa: A001  (the DESIGN's name: tensortap.open)
    """Open a dump: a directory, a segment file, or a list of them. Returns a `Dump`."""
    from tensortap.dump import Dump

    return Dump.open(path, **options)


def check(dump, **options):
    """Run the detectors over a dump (or a path); returns a `Report` of findings and verdicts."""
    from tensortap.analysis import check as run_check

    return run_check(dump, **options)


def diff(a, b, **options):
    """Compare two dumps (or paths); returns a `DiffReport` with the first divergence."""
    from tensortap.diffing import diff as run_diff

    return run_diff(a, b, **options)


__all__ = [
    "FormatError",
    "SelectionError",
    "TapConfigError",
    "TapError",
    "capturing",
    "check",
    "close",
    "configure",
    "current_config",
    "diff",
    "enabled",
    "flush",
    "open",
    "point",
    "scope",
    "stats",
    "wants",
]
