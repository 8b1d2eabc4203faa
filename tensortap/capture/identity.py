"""Who is writing: rank discovery and the run identity stored in every segment."""

from __future__ import annotations

import functools
import os
import secrets
import socket
import sys
import time


def discover_rank() -> tuple[int, int, bool]:
    """(rank, world_size, from_process_group): torch.distributed when initialised, else RANK/WORLD_SIZE, else 0/1."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    return _environment_rank() + (False,)


@functools.lru_cache(maxsize=1)
def _environment_rank() -> tuple[int, int]:
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def run_identity(rank: int, world_size: int) -> dict:
    """Root attributes of a segment: enough to tell which process of which run wrote it.

    `run_id` (8 hex digits, new for every writer run: each configure()) is also in every segment's
    file name. Library versions are read without importing h5py (writer=process never loads it here)."""
    from tensortap import __version__

    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "start_time_ns": time.time_ns(),
        "run_id": secrets.token_hex(4),
        "argv": list(sys.argv),
        "rank": rank,
        "world_size": world_size,
        "versions": {
            "tensortap": __version__,
            "torch": _version("torch"),
            "numpy": _version("numpy"),
            "h5py": _version("h5py"),
            "python": sys.version.split()[0],
        },
    }


@functools.lru_cache(maxsize=None)
def _version(package: str) -> str:
    module = sys.modules.get(package)
    if module is not None and isinstance(getattr(module, "__version__", None), str):
        return module.__version__
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "unknown"
