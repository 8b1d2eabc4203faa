"""tensortap plot and tensortap report write their files from a dump."""


def test_plot_writes_a_png(dumps, tmp_path, cli):
    target = tmp_path / "draft.png"
    code, out, _ = cli(["plot", dumps["bug"], "-o", target, "--step", "0", "--role", "draft", "--spec-pos", "0"])
    assert code == 0 and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_asks_to_narrow_a_wide_selection(dumps, tmp_path, cli):
    code, _, err = cli(["plot", dumps["bug"], "-o", tmp_path / "x.png"])
    assert code == 2 and "forwards match" in err and "--step" in err


def test_report_is_self_contained_html(dumps, tmp_path, cli):
    target = tmp_path / "report.html"
    code, _, _ = cli(["report", dumps["bug"], "-o", target, "--no-oracle"])
    page = target.read_text()
    assert code == 1 and page.startswith("<!doctype html>")
    assert "LAUNDERED CONSENSUS" in page and "data:image/png;base64," in page
    code, _, _ = cli(["report", dumps["dcp4"], "-o", tmp_path / "clean.html"])
    assert code == 0 and "clean: no findings" in (tmp_path / "clean.html").read_text()
