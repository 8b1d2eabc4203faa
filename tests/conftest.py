"""Shared fixtures: a clean tap per test, a tap directory, and the CLI runner."""

from __future__ import annotations

import os

import pytest
import torch

import tensortap


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_tap():
    """Every test starts and ends with the tap disabled."""
    tensortap.close()
    yield
    tensortap.close()


@pytest.fixture
def tap_dir(tmp_path):
    return str(tmp_path / "tap")


@pytest.fixture
def cli():
    """Run the tensortap CLI in-process: cli(["ls", path]) -> (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from tensortap.cli import app

    runner = CliRunner()

    def run(args):
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return run


SMALL = dict(steps=2, spec_tokens=1)


@pytest.fixture(scope="session")
def dumps(tmp_path_factory):
    """Dumps of the reference on 4 gloo ranks: the bug, and clean runs over DCP 1/2/4, interleave 1/2, ag_rs/a2a."""
    import dataclasses

    from tensortap.distributed import spawn
    from tensortap.mla.scenario import Scenario, run_rank

    base = tmp_path_factory.mktemp("dumps")
    configs = {
        "bug": Scenario(**SMALL),
        "dcp1": Scenario(dcp=1, fixed=True, **SMALL),
        "dcp2-i2-a2a": Scenario(dcp=2, interleave=2, backend="a2a", fixed=True, **SMALL),
        "dcp4": Scenario(fixed=True, **SMALL),
        "dcp4-i2-a2a": Scenario(interleave=2, backend="a2a", fixed=True, **SMALL),
        "dcp4-bf16": Scenario(dtype="bfloat16", fixed=True, **SMALL),
        "dcp1-bf16": Scenario(dcp=1, dtype="bfloat16", fixed=True, **SMALL),
        "dcp2-fp16": Scenario(dcp=2, dtype="float16", fixed=True, **SMALL),
        "short-prompts": Scenario(fixed=True, prompt_lens=(1, 2, 5), **SMALL),
    }
    paths = {}
    for name, scn in configs.items():
        paths[name] = str(base / name)
        spawn(run_rank, scn.ranks, kwargs=dict(scenario=dataclasses.asdict(scn), tap_dir=paths[name]), timeout=300)
    return paths


def segment_files(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory) if ".tap.h5" in f) if os.path.isdir(directory) else []


def torn_by_a_flush(dump) -> bool:
    """The one loss a SIGKILL can still cause (docs/crash-safety.md): the process was killed inside an
    HDF5 flush and a metadata block of the open segment's record list was left half written. The
    reader names it: format 2 looks the batches up by name ("its record list was torn"; a test then
    still finds every flushed forward unless a lookup failed too), format 1 gives the segment up ("its
    record list is unreadable"); and where the flush tore an object the file's own root needs, the
    segment is "unreadable, no record survived (... addr overflow ...)". Seen once in about 25 kills
    with writer=thread on the 2-core VM, never in 420 on a 16-core host (docs/crash-safety.md)."""
    return any("record list is unreadable" in s.truncation or "record list was torn" in s.truncation
               or ("no record survived" in s.truncation and "addr overflow" in s.truncation)
               for s in dump.truncated)
