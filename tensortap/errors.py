"""Errors a user sees: each carries one line that names the file or key and the fix."""


class TapError(Exception):
    """Base of every tensortap error that the CLI turns into one line and exit code 2."""


class TapConfigError(TapError, ValueError):
    """A malformed TAP value or configure() argument."""


class FormatError(TapError):
    """A file that is not a readable tensortap dump (foreign, corrupted, hostile, unknown version)."""

    def __init__(self, path, problem: str, fix: str = ""):
        self.path = str(path)
        self.problem = problem
        message = f"{self.path}: {problem}"
        if fix:
            message += f"; {fix}"
        super().__init__(message)


class SelectionError(TapError, LookupError):
    """A query on a Dump that matched nothing, or more than the one record asked for."""
