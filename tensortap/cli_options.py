"""What every `tensortap` command shares: one-line usage errors, help without type tags, the record
selection options (--step --layer --role --rank --spec-pos) and the checks of output paths.

A selection that matches nothing names the option whose value matched nothing and lists what the
records selected so far hold for it, e.g.
`--spec-pos 5 matches no record of step 0, role draft: they have spec_pos 0-1`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
import typer.core

from typer.core import TyperArgument, TyperOption

try:  # typer >= 0.26 vendors click: its exceptions and contexts are typer's own
    from typer._click import exceptions as click_errors
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors, get_current_context
from rich.console import Console
from rich.text import Text

from tensortap.errors import SelectionError
from tensortap.text import span
from tensortap.vocab import ROLES

err = Console(stderr=True, highlight=False, soft_wrap=True)


def usage_error(message: str) -> click_errors.UsageError:
    """A usage error of the running command: one line on stderr, exit code 2."""
    return click_errors.UsageError(message, ctx=get_current_context(silent=True))


def _untag(params: list) -> list:
    """Help without `<bool>` tags on flags, nor `<list[Path]>` beside an argument's own name (DUMP...)."""
    for param in params:
        if isinstance(param, TyperOption) and (param.is_flag or param.name == "help"):
            param.metavar = ""
        elif isinstance(param, TyperArgument) and param.metavar:
            param.display_type_rich = lambda ctx: None
    return params


class Command(typer.core.TyperCommand):
    def get_params(self, ctx):
        return _untag(super().get_params(ctx))


class Group(typer.core.TyperGroup):
    """The app: usage errors (a missing argument, a bad option value) print one line, never a box."""

    def get_params(self, ctx):
        return _untag(super().get_params(ctx))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args=args, prog_name="tensortap", complete_var=complete_var,
                                standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:
            typer.echo(exc.format_message())
            code = 2
        except click_errors.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "tensortap"
            err.print(Text(f"error: {exc.format_message().rstrip('.')}; see '{where} --help'"))
            code = 2
        except click_errors.ClickException as exc:
            err.print(Text(f"error: {exc.format_message()}"))
            code = exc.exit_code
        except typer.Abort:
            err.print(Text("aborted"))
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


# -- the selection options: the same declaration on every command that selects records -------------
STEP = typer.Option(None, "--step", help="Step.")
LAYER = typer.Option(None, "--layer", help="Layer (negative counts from the last).")
ROLE = typer.Option(None, "--role", help="target or draft.")
RANK = typer.Option(None, "--rank", help="Global rank.")
SPEC_POS = typer.Option(None, "--spec-pos", help="Draft pass (0 = the first speculative token).")


@dataclass(frozen=True)
class Selection:
    step: Optional[int] = None
    layer: Optional[int] = None
    role: Optional[str] = None
    rank: Optional[int] = None
    spec_pos: Optional[int] = None

    # (option, field, record key) in the order they narrow a dump
    ORDER = (("--role", "role", "role"), ("--step", "step", "step"), ("--spec-pos", "spec_pos", "spec_pos"),
             ("--layer", "layer", "layer"), ("--rank", "rank", "rank"))

    def given(self) -> list[tuple[str, str, object]]:
        return [(opt, key, getattr(self, name)) for opt, name, key in self.ORDER if getattr(self, name) is not None]

    def apply(self, dump, point: str | None = None, where: str = ""):
        """The records of `dump` matching every given option (and `point`, a point or a full name).

        Raises SelectionError naming the first option whose value matched nothing and what the
        records selected before it hold (prefixed by `where`, e.g. "B", when there are two dumps)."""
        if self.role is not None and self.role not in ROLES:
            raise usage_error(f"--role {self.role!r} is not a role; choose from {', '.join(ROLES)}")
        sub, narrowed = dump, []
        try:
            if point is not None:
                sub = _narrow(sub, "point", point, "POINT", narrowed)
            for opt, key, value in self.given():
                sub = _narrow(sub, key, value, opt, narrowed)
        except SelectionError as exc:
            if where:
                raise SelectionError(f"{where}: {exc}") from None
            raise
        return sub


def _narrow(sub, key: str, value, option: str, narrowed: list):
    picked = sub.select(point=value) if key == "point" else sub.select(**{key: value})
    if len(picked):
        narrowed.append(str(value) if key == "point" else f"{key.replace('_', ' ')} {value}")
        return picked
    where = f"of {', '.join(narrowed)}" if narrowed else "in the dump"
    if key == "point":
        names = sorted({rec.name for rec in sub}) if "." in str(value) else sub.points
        raise SelectionError(f"{option} {value!r} matches no record {where}: they have points {', '.join(names)}")
    values = held(sub, key)
    listing = span(values) if values and all(isinstance(v, int) for v in values) else ", ".join(map(str, values))
    raise SelectionError(f"{option} {value} matches no record {where}: "
                         + (f"they have {key} {listing}" if values else f"they carry no {key}"))


def held(sub, key: str) -> list:
    """The distinct values of metadata `key` in the records of `sub`, sorted."""
    values = {rec.meta.get(key) for rec in sub if rec.meta.get(key) is not None}
    return sorted(values, key=lambda v: (0, v) if isinstance(v, (int, float)) else (1, str(v)))


# -- outputs: checked before any work is done ----------------------------------------------------
def check_output(path: Path, suffixes: tuple[str, ...], option: str = "-o") -> Path:
    """An output file we can write: a known suffix, an existing writable directory, not a directory."""
    if path.is_dir():
        raise usage_error(f"{option} {path}: is a directory; give a file name ending in {suffixes[0]}")
    if path.suffix.lower() not in suffixes:
        names = ", ".join(suffixes[:-1]) + f" or {suffixes[-1]}" if len(suffixes) > 1 else suffixes[0]
        raise usage_error(f"{option} {path}: cannot write {path.suffix or 'a file without a suffix'}; "
                          f"name the file {names}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise usage_error(f"{option} {path}: directory {parent} does not exist; create it or write elsewhere")
    if not os.access(parent, os.W_OK):
        raise usage_error(f"{option} {path}: directory {parent} is not writable; write elsewhere")
    return path
