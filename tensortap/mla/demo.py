"""`tensortap demo`: reproduce the laundered-consensus bug (or its fix) on N ranks and dump it.

Spawns N ranks (gloo on CPU, NCCL on GPUs), runs the target and the MTP-style draft layer
with the tap on, and returns where the dump went and what it holds.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

from tensortap.errors import TapError
from tensortap.mla.scenario import Scenario, run_rank


@dataclass
class DemoRun:
    scenario: Scenario
    out: str
    seconds: float
    backend: str


def default_out(fixed: bool) -> str:
    return os.path.join("tensortap-demo", f"{'fixed' if fixed else 'bug'}-{time.strftime('%Y%m%d-%H%M%S')}")


def run_demo(scenario: Scenario, out: str, device: str = "cpu", timeout: float = 600.0) -> DemoRun:
    """Run the scenario on `scenario.ranks` fresh processes with TAP writing to `out`."""
    from tensortap.distributed import spawn

    if os.path.isdir(out) and any(".tap.h5" in f for f in os.listdir(out)):
        raise TapError(f"{out}: holds a dump already; pass --out with a new directory (or delete this one)")
    backend = "gloo"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() < scenario.ranks:
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise TapError(f"--device cuda needs {scenario.ranks} GPUs, found {found}; use --device cpu or --ranks {found}")
        backend = "nccl"
    elif device != "cpu":
        raise TapError(f"--device must be cpu or cuda, not {device!r}")
    start = time.monotonic()
    env = {"TAP": ""}  # the ranks configure their own tap; an outer TAP must not leak in
    spawn(run_rank, scenario.ranks, backend=backend, timeout=timeout, env=env,
          kwargs=dict(scenario=dataclasses.asdict(scenario), tap_dir=out))
    return DemoRun(scenario, out, time.monotonic() - start, backend)
