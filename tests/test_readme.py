"""The README is true: CI runs its test command, its Python runs as pasted against the demo dump,
its capture example can produce the verdict, its links resolve inside the repository, and the
tap-your-model example runs."""

import os
import re
import subprocess
import sys

import tensortap
from tensortap.analysis.findings import CODES
from tensortap.config import parse_tap
from tensortap.vocab import POINTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def block_after(heading: str, language: str = "") -> str:
    """The first fenced block (```language) after the heading line."""
    text = read("README.md")
    start = text.index(heading)
    match = re.search(rf"```{language}\n(.*?)```", text[start:], re.S)
    return match.group(1)


def test_ci_runs_exactly_the_readme_test_command():
    ci = read(".ci/run").splitlines()
    command = ci[ci.index("# README test command:") + 1]
    assert "pytest" in command
    assert command in read("README.md").splitlines()


def test_the_python_snippet_runs_as_pasted_against_the_demo_dump(dumps, capsys):
    snippet = block_after("## Read a dump in Python", "python")
    pasted, n = re.subn(r'^DUMP = ".*?"', f"DUMP = {dumps['bug']!r}", snippet, count=1, flags=re.M)
    assert n == 1, "the snippet names its dump in one DUMP = ... line"
    exec(compile(pasted, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "<Dump 4 ranks" in printed and "torch.Size([2, 2])" in printed
    assert "('laundered consensus', 78, 'draft')" in printed
    assert "draft/target layer 78/77 step 0 spec 0 q rank 0" in printed


def test_the_capture_example_is_enough_for_the_verdict(dumps):
    line = next(x for x in block_after("## Capture: the `TAP` variable").splitlines() if x.startswith("TAP="))
    config = parse_tap(line.split("=", 1)[1].strip('"'))
    points = [p for p in POINTS if config.filter.points is None or p in config.filter.points]
    assert {"q", "topk", "partial_out", "lse", "merged_out", "o_proj_partial", "hidden"} <= set(points)
    only = tensortap.open(dumps["bug"]).select(point=points)
    report = tensortap.check(only, use_oracle=False)
    assert [(v.name, v.layer, v.role) for v in report.verdicts] == [("laundered consensus", 78, "draft")]


# The topic docs other engineers write (serving, flight recorder, crash safety, check, reading).
PROMISED = {"docs/serving.md", "docs/flight-recorder.md", "docs/crash-safety.md", "docs/check.md", "docs/reading.md"}


def links() -> list[str]:
    return re.findall(r"\]\(([^)#]+)\)", read("README.md"))


def test_links_stay_inside_the_repository_and_resolve():
    text = read("README.md")
    assert "DESIGN" not in text and "../" not in text and "facts/" not in text
    assert {"docs/tap-points.md", "docs/budgets.md", "LICENSE"} | PROMISED <= set(links())
    missing = [link for link in links() if not link.startswith("http") and link not in PROMISED
               and not os.path.exists(os.path.join(ROOT, link))]
    assert not missing, f"README links to files that are not in the repository: {missing}"


def test_the_topic_docs_the_readme_links_exist():
    missing = sorted(link for link in PROMISED if not os.path.exists(os.path.join(ROOT, link)))
    assert not missing, f"README links to {missing}: their owners have not written them yet"


def test_every_detector_is_in_the_readme():
    text = read("README.md")
    assert [code for code in CODES if f"| `{code}` |" not in text] == []


def test_the_license_matches_pyproject():
    assert 'license = { text = "Apache-2.0" }' in read("pyproject.toml")
    assert "Apache License" in read("LICENSE") and "Version 2.0, January 2004" in read("LICENSE")


def test_tap_your_model_example_runs(tmp_path):
    target = tmp_path / "mine"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "tap_your_model.py"), str(target)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "TAP": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "<Dump 2 ranks, 2 steps, 1 layers, 4 points" in done.stdout
    d = tensortap.open(str(target))
    assert d.points == ["attn_out", "hidden", "merged_out", "o_proj_partial"] and len(d) == 16
    hidden = d.stack("hidden", over="rank", step=1)  # [2, T, hidden]
    assert bool((hidden[0] == hidden[1]).all()), "the all-reduce made hidden identical"
    assert d.record("merged_out", step=0, rank=1).meta["head_offset"] == 4
    assert "check:" in done.stdout
