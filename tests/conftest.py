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


def segment_files(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory) if ".tap.h5" in f) if os.path.isdir(directory) else []
