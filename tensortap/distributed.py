"""Spawn N ranks in-process (gloo on CPU, NCCL on GPUs) with a file-store rendezvous.

    results = spawn(fn, world_size=4, workdir=tmp, backend="gloo", kwargs={...})

Each rank runs `fn(rank, world_size, **kwargs)` after `init_process_group`; results come
back in rank order. A failing rank's traceback is reported as `[rank r] ...`; ranks still
running after `timeout` seconds are killed. Under torchrun, use `init_from_env()` instead.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import tempfile
import time
import traceback
from typing import Callable

from tensortap.errors import TapError


class SpawnError(TapError):
    """One or more ranks failed or timed out; the message holds each rank's traceback."""


def _rank_entry(fn, rank, world_size, init_file, backend, results, kwargs, env):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            value = fn(rank, world_size, **kwargs)
        finally:
            dist.destroy_process_group()
        buffer = io.BytesIO()  # by value: shared-memory tensor handles die with this process
        torch.save(value, buffer)
        results.put(("ok", rank, buffer.getvalue()))
    except BaseException:
        results.put(("error", rank, traceback.format_exc()))


def spawn(
    fn: Callable,
    world_size: int,
    workdir: str | None = None,
    backend: str = "gloo",
    kwargs: dict | None = None,
    timeout: float = 300.0,
    env: dict | None = None,
) -> list:
    """Run `fn` on `world_size` fresh processes; return their results in rank order."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    workdir = workdir or tempfile.mkdtemp(prefix="tensortap-spawn-")
    init_file = os.path.join(workdir, f"rendezvous-{os.getpid()}-{time.monotonic_ns()}")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_entry, args=(fn, r, world_size, init_file, backend, results, kwargs or {}, env or {}),
                    daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < world_size and time.monotonic() < deadline:
        try:
            status, rank, value = results.get(timeout=0.2)
            if status == "ok":
                import torch

                value = torch.load(io.BytesIO(value), weights_only=True)
            outcomes[rank] = (status, value)
            if status == "error":
                deadline = min(deadline, time.monotonic() + 10.0)  # peers may be stuck in a collective
        except queue_module.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())) + 0.1)
    for rank, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
            outcomes.setdefault(rank, ("error", f"killed after {timeout:.0f}s timeout (a peer may have failed)\n"))
        elif rank not in outcomes:
            outcomes[rank] = ("error", f"exited with code {p.exitcode} without a result\n")
    try:
        os.unlink(init_file)
    except OSError:
        pass
    failures = [(r, v) for r, (s, v) in sorted(outcomes.items()) if s == "error"]
    if failures:
        lines = []
        for rank, text in failures:
            lines.extend(f"[rank {rank}] {line}" for line in str(text).rstrip().splitlines())
        raise SpawnError(f"{len(failures)} of {world_size} ranks failed:\n" + "\n".join(lines))
    return [outcomes[r][1] for r in range(world_size)]


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Under torchrun: init the default process group from the environment; returns (rank, world_size)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()
