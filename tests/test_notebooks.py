"""The notebooks of analyze/ run from top to bottom and show what they promise."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ANALYZE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "analyze")


def run(name: str, tmp_path) -> str:
    nb = nbformat.read(os.path.join(ANALYZE, name), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            texts.extend(str(v) for v in output.get("data", {}).values())
    return "\n".join(texts)


@pytest.mark.slow
def test_laundered_consensus_notebook(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORTAP_DUMP", raising=False)
    text = run("laundered_consensus.ipynb", tmp_path)
    assert "LAUNDERED CONSENSUS draft layer 78" in text
    assert "torch.Size([4, 2, 64]) True" in text
    assert "image/png" in text or "iVBOR" in text


@pytest.mark.slow
def test_diff_layouts_notebook(tmp_path):
    text = run("diff_layouts.ipynb", tmp_path)
    assert "shard-aware equal" in text
    assert "partial_out" in text
