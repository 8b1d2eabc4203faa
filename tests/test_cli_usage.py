"""Usage errors are one line with exit code 2 and are caught before any work; every command's help has
examples and no type tags; every selection takes --step --layer --role --rank --spec-pos and says
which value matched nothing."""

import os

import pytest

import tensortap

COMMANDS = ["ls", "show", "check", "diff", "plot", "report", "demo"]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "BadParameter" not in err and "None" not in err, err
    return lines[0]


def test_version(cli):
    code, out, _ = cli(["--version"])
    assert code == 0 and out.strip() == f"tensortap {tensortap.__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_examples_and_no_type_tags(cli, command):
    code, out, _ = cli([command, "--help"])
    assert code == 0 and "Examples:" in out and f"tensortap {command}" in out
    assert "<bool>" not in out and "None" not in out


def test_missing_arguments_are_one_line(cli, dumps):
    code, _, err = cli(["diff"])
    assert code == 2 and one_line(err) == "error: Missing argument 'A'; see 'tensortap diff --help'"
    code, _, err = cli(["show", dumps["bug"]])
    assert code == 2 and one_line(err) == "error: Missing argument 'POINT'; see 'tensortap show --help'"
    code, _, err = cli(["diff", dumps["bug"]])
    assert code == 2 and one_line(err).startswith("error: missing dump B: give two dumps")
    code, _, err = cli(["show", dumps["bug"], "lse", "--step", "x"])
    assert code == 2 and "'--step'" in one_line(err)


def test_show_selects_one_draft_record_with_spec_pos(cli, dumps):
    code, out, _ = cli(["show", dumps["bug"], "lse", "--step", "0", "--role", "draft", "--spec-pos", "0", "--rank", "1"])
    assert code == 0 and "layers.78.attn.lse" in out and "spec_pos: 0" in out and "tensor(" in out
    code, out, _ = cli(["show", dumps["bug"], "lse", "--step", "0", "--rank", "1"])
    assert code == 0 and "2 records match; narrow with --layer, --role, --spec-pos to see one" in out


def test_a_selection_error_names_the_value_and_what_the_dump_holds(cli, dumps):
    code, _, err = cli(["show", dumps["bug"], "lse", "--step", "0", "--role", "draft", "--spec-pos", "5"])
    assert code == 2
    assert one_line(err) == "error: --spec-pos 5 matches no record of lse, role draft, step 0: they have spec_pos 0"
    code, _, err = cli(["show", dumps["bug"], "lse", "--step", "9"])
    assert code == 2 and one_line(err) == "error: --step 9 matches no record of lse: they have step 0-1"
    code, _, err = cli(["show", dumps["bug"], "lsee"])
    assert code == 2 and one_line(err).startswith("error: POINT 'lsee' matches no record in the dump: they have "
                                                  "points attn_out, block_table, hidden,")
    code, _, err = cli(["show", dumps["bug"], "lse", "--role", "targt"])
    assert code == 2 and "--role 'targt' is not a role; choose from target, draft" in one_line(err)


def test_plot_takes_the_same_selection_options(cli, dumps, tmp_path):
    target = tmp_path / "x.png"
    code, _, err = cli(["plot", dumps["bug"], "-o", target, "--step", "7"])
    assert code == 2 and one_line(err) == "error: --step 7 matches no record in the dump: they have step 0-1"
    code, _, err = cli(["plot", dumps["bug"], "-o", target, "--step", "0", "--role", "draft", "--spec-pos", "3"])
    assert code == 2 and "--spec-pos 3 matches no record of role draft, step 0: they have spec_pos 0" in one_line(err)
    assert not target.exists()


@pytest.mark.parametrize("point", ["lsee", "lse", "topk", "attn_out"])
def test_plot_refuses_points_it_cannot_draw(cli, dumps, tmp_path, point):
    target = tmp_path / "x.png"
    code, _, err = cli(["plot", dumps["bug"], "-o", target, "--point", point, "--step", "0", "--role", "target"])
    assert code == 2 and f"--point '{point}'" in one_line(err) and "choose from q, partial_out, merged_out" in err
    assert not target.exists()


def test_outputs_are_checked_before_the_work(cli, dumps, tmp_path):
    code, _, err = cli(["plot", dumps["bug"], "-o", "/nonexistent/x.png", "--step", "0", "--role", "target"])
    assert code == 2 and "directory /nonexistent does not exist" in one_line(err)
    code, _, err = cli(["plot", dumps["bug"], "-o", tmp_path / "x.txt", "--step", "0", "--role", "target"])
    assert code == 2 and "cannot write .txt; name the file .png, .svg or .pdf" in one_line(err)
    code, _, err = cli(["report", dumps["bug"], "-o", tmp_path / "x.pdf"])
    assert code == 2 and "cannot write .pdf; name the file .html or .htm" in one_line(err)
    code, _, err = cli(["report", dumps["bug"], "-o", tmp_path])
    assert code == 2 and "is a directory" in one_line(err)
    assert sorted(os.listdir(tmp_path)) == []


def test_demo_without_gpus_is_a_usage_error_before_any_work(cli, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = cli(["demo", "--device", "cuda", "--out", tmp_path / "g"])
    assert code == 2 and one_line(err) == ("error: --device cuda needs 4 GPUs (one a rank), found 0; run on CPU "
                                           "ranks with --device cpu; see 'tensortap demo --help'")
    assert not (tmp_path / "g").exists()
    code, _, err = cli(["demo", "--device", "tpu"])
    assert code == 2 and "--device 'tpu'" in one_line(err)


def test_ls_does_not_cut_the_points_at_80_columns(cli, dumps, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = cli(["ls", dumps["bug"]])
    assert code == 0 and "…" not in out
    listed = next(line for line in out.splitlines() if line.startswith("points (11): "))
    assert listed.split(": ", 1)[1].split(", ") == sorted(tensortap.open(dumps["bug"]).points)
