"""Who is writing: rank discovery and the run identity stored in every segment."""

from __future__ import annotations

import functools
import os
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
    """Root attributes of a segment: enough to tell which process of which run wrote it."""
    import h5py
    import numpy
    import torch

    from tensortap import __version__

    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "start_time_ns": time.time_ns(),
        "argv": list(sys.argv),
        "rank": rank,
        "world_size": world_size,
        "versions": {
            "tensortap": __version__,
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "h5py": h5py.__version__,
            "python": sys.version.split()[0],
        },
    }
