"""`tensortap ls` and `tensortap show`: tables, --json, exit codes."""

import json

import torch

import tensortap


def small_dump(directory):
    tensortap.configure(dir=directory)
    for rank in range(2):
        for step in range(3):
            with tensortap.scope(step=step, role="draft", rank=rank, layer=5):
                q = torch.randn(2, 4, 8)
                q[:, 2] = 0
                tensortap.point("layers.5.attn.q", q)
                tensortap.point("layers.5.attn.topk", torch.tensor([[1, -1], [-1, -1]], dtype=torch.int32))
    tensortap.close()
    return directory


def test_ls_table_and_json(tap_dir, cli):
    small_dump(tap_dir)
    code, out, err = cli(["ls", tap_dir])
    assert code == 0 and err == ""
    assert "<Dump 2 ranks, 3 steps, 1 layers, 2 points" in out
    assert "0-2" in out and "points (2): q, topk" in out
    code, out, _ = cli(["ls", tap_dir, "--json"])
    data = json.loads(out)
    assert code == 0 and data["ranks"] == [0, 1] and data["steps"] == [0, 1, 2] and data["records"] == 12
    assert data["per_rank"][1]["records"] == 6 and data["truncated_segments"] == [] and data["dropped"] == {}


def test_show_one_record(tap_dir, cli):
    small_dump(tap_dir)
    code, out, _ = cli(["show", tap_dir, "q", "--step", "1", "--rank", "0"])
    assert code == 0 and "layers.5.attn.q" in out and "zero_heads=1" in out and "tensor(" in out
    code, out, _ = cli(["show", tap_dir, "layers.5.attn.topk", "--step", "1", "--rank", "1", "--json"])
    data = json.loads(out)
    assert data["slice"] == [[1, -1], [-1, -1]] and data["stats"]["empty_rows"] == 1
    assert data["meta"]["role"] == "draft"


def test_show_lists_several_matches(tap_dir, cli):
    small_dump(tap_dir)
    code, out, _ = cli(["show", tap_dir, "q", "--step", "1"])
    assert code == 0 and "2 records match" in out
    code, out, _ = cli(["show", tap_dir, "q", "--json"])
    assert len(json.loads(out)["matches"]) == 6


def test_show_nothing_matches(tap_dir, cli):
    small_dump(tap_dir)
    code, out, err = cli(["show", tap_dir, "lse"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.strip() == "error: POINT 'lse' matches no record in the dump: they have points q, topk"


def test_usage_error_exit_code(cli):
    code, _, _ = cli(["ls"])
    assert code == 2
