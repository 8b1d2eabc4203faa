"""tensortap demo: spawns the ranks, dumps, prints the verdict; --fixed comes out clean."""

import tensortap


def test_demo_bug_and_fix(tmp_path, cli):
    code, out, err = cli(["demo", "--out", tmp_path / "bug", "--preset", "tiny", "--steps", "1"])
    assert code == 0, err
    assert "LAUNDERED CONSENSUS draft layer 78: ranks 1-3 emit all-zero attention for heads 2-7 (6/8)" in out
    assert "rank 1: 2/2" in out and len(tensortap.open(str(tmp_path / "bug")).ranks) == 4
    code, out, _ = cli(["demo", "--out", tmp_path / "fixed", "--preset", "tiny", "--steps", "1", "--fixed"])
    assert code == 0 and "check: clean" in out


def test_demo_refuses_a_used_directory_and_bad_sizes(tmp_path, cli):
    assert cli(["demo", "--out", tmp_path / "d", "--preset", "tiny", "--steps", "1"])[0] == 0
    code, _, err = cli(["demo", "--out", tmp_path / "d", "--preset", "tiny"])
    assert code == 2 and "holds a dump already" in err
    assert cli(["demo", "--ranks", "3"])[0] == 2
    assert cli(["demo", "--preset", "huge"])[0] == 2
    code, _, err = cli(["demo", "--device", "cuda", "--out", tmp_path / "g"]) if not _cuda() else (2, "", "GPUs")
    assert code == 2 and "GPUs" in err


def _cuda():
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= 4
