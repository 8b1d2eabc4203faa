"""The README's commands are the ones CI runs."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_ci_runs_exactly_the_readme_test_command():
    ci = read(".ci/run").splitlines()
    command = ci[ci.index("# README test command:") + 1]
    assert "pytest" in command
    assert command in read("README.md").splitlines()
