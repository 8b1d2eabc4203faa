"""The notebooks of analyze/ run from top to bottom, show what they promise, use only the public API,
and are committed with their outputs (figures included) so a reader sees them without running them."""

import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

ANALYZE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "analyze")
NOTEBOOKS = ("laundered_consensus.ipynb", "diff_layouts.ipynb")


def texts(nb) -> str:
    out = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            out.append(output.get("text", ""))
            out.extend(str(v) for v in output.get("data", {}).values())
    return "\n".join(out)


def run(name: str, tmp_path) -> str:
    nb = nbformat.read(os.path.join(ANALYZE, name), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return texts(nb)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_with_outputs_and_public_api_only(name):
    nb = nbformat.read(os.path.join(ANALYZE, name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("outputs") for c in code), "every code cell has its committed output"
    assert any("image/png" in o.get("data", {}) for c in code for o in c["outputs"]), "a figure is visible"
    assert not [o for c in code for o in c["outputs"] if o.get("output_type") == "error"]
    source = "\n".join(c.source for c in code)
    imports = set(re.findall(r"^\s*(?:from|import) (tensortap[\w.]*)", source, re.M))
    assert imports <= {"tensortap", "tensortap.plot"}, imports
    assert not re.search(r"\._[a-z]", source.replace("tensortap.cli", "")), "no private attributes"


@pytest.mark.slow
def test_laundered_consensus_notebook(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORTAP_DUMP", raising=False)
    text = run("laundered_consensus.ipynb", tmp_path)
    assert "LAUNDERED CONSENSUS draft layer 78" in text
    assert "torch.Size([4, 2, 64]) True" in text
    assert "image/png" in text or "iVBOR" in text


@pytest.mark.slow
def test_diff_layouts_notebook_shows_equal_and_a_real_divergence(tmp_path):
    text = run("diff_layouts.ipynb", tmp_path)
    assert "target: shard-aware equal" in text
    assert "first divergence: draft layer 78 step 0 spec 0 merged_out rank all" in text
    assert "partial_out" in text and ("image/png" in text or "iVBOR" in text)
