"""tensortap plot and tensortap report: figures from full and stats dumps, one colour per rank, runs
side by side on one scale, and a styled self-contained report with a figure per verdict."""

import re

import matplotlib
import pytest

import tensortap
from tensortap import plot

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def stats_dump(tmp_path_factory, dumps):
    """The session's bug dump captured again, record by record through the public tap API, with mode=stats:
    no tensors, only their stats (what a server's cheap capture keeps)."""
    from tensortap.format import schema

    target = str(tmp_path_factory.mktemp("stats") / "bug")
    tensortap.configure(dir=target, mode="stats")
    with tensortap.open(dumps["bug"]) as d:
        for rec in sorted(d, key=lambda rec: (rec.rank, rec.meta["seq"])):
            tensortap.point(rec.name, rec.tensor(), **{k: v for k, v in rec.meta.items() if k not in schema.SYSTEM_FIELDS})
    tensortap.close()
    return target


def test_plot_writes_a_png(dumps, tmp_path, cli):
    target = tmp_path / "draft.png"
    code, out, _ = cli(["plot", dumps["bug"], "-o", target, "--step", "0", "--role", "draft", "--spec-pos", "0"])
    assert code == 0 and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_asks_to_narrow_a_wide_selection(dumps, tmp_path, cli):
    code, _, err = cli(["plot", dumps["bug"], "-o", tmp_path / "x.png"])
    assert code == 2 and "forwards match" in err and "pass --step, --layer, --role, --spec-pos" in err
    assert "None" not in err and len(err.strip().splitlines()) == 1


def test_one_colour_per_rank_labels_on_every_panel_and_words_for_identical(dumps):
    fig = plot.forward(tensortap.open(dumps["dcp4"]), step=0, role="draft", spec_pos=0)
    heads, shares, hidden = fig.axes
    assert all(ax.get_ylabel() for ax in fig.axes), "a y-label on every panel"
    lines = {line.get_label(): matplotlib.colors.to_rgba(line.get_color()) for line in heads.lines}
    bars = [matplotlib.colors.to_rgba(p.get_facecolor()) for p in shares.patches]
    assert [lines[f"rank {r}"] for r in range(4)] == bars == [plot.rank_colour(r) for r in range(4)]
    assert not hidden.patches and hidden.get_yticks().size == 0, "no empty -0.04..0.04 axis"
    assert "identical" in " ".join(t.get_text() for t in hidden.texts)


def test_the_bug_drops_heads_to_zero_and_leaves_one_rank_feeding_o_proj(dumps):
    data = plot.read_forward(tensortap.open(dumps["bug"]).select(step=0, role="draft", spec_pos=0))
    assert sorted(data.norms) == [0, 1, 2, 3] and not data.stats_only
    assert all(not data.norms[r][1].any() for r in (1, 2, 3)) and data.norms[0][1].all()
    assert data.shares[0] > 0 and all(data.shares[r] == 0 for r in (1, 2, 3))
    assert set(data.hidden_gap.values()) == {0.0}


def test_plot_draws_from_a_stats_dump(stats_dump, tmp_path, cli):
    d = tensortap.open(stats_dump)
    assert d.nbytes == 0, "mode=stats keeps no tensors"
    data = plot.read_forward(d.select(step=0, role="draft", spec_pos=0))
    assert data.stats_only and sorted(data.norms) == [0, 1, 2, 3]
    assert data.norms[0][1].all() and all(not data.norms[r][1].any() for r in (1, 2, 3)), "zero heads from stats"
    assert sorted(data.hidden_hash) == [0, 1, 2, 3] and len(set(data.hidden_hash.values())) == 1, "consensus hash"
    full = plot.read_forward(tensortap.open(stats_dump).select(step=0, role="target"))
    assert all(norms.all() for _, norms in full.norms.values())
    target = tmp_path / "stats.png"
    code, _, err = cli(["plot", stats_dump, "-o", target, "--step", "0", "--role", "draft", "--spec-pos", "0"])
    assert code == 0 and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", err


def test_two_runs_side_by_side_on_one_scale(dumps, tmp_path, cli):
    fig = plot.forwards([("bug", tensortap.open(dumps["bug"])), ("fixed", tensortap.open(dumps["dcp4"]))],
                        step=0, role="draft", spec_pos=0)
    assert len(fig.axes) == 6 and fig.axes[0].get_ylim() == fig.axes[3].get_ylim()
    assert fig.axes[0].get_title().startswith("bug: ") and fig.axes[3].get_title().startswith("fixed: ")
    own = plot.forwards([("bug", tensortap.open(dumps["bug"])), ("fixed", tensortap.open(dumps["dcp4"]))],
                        step=0, role="draft", spec_pos=0, share_scale=False)
    assert own.axes[0].get_ylim() != own.axes[3].get_ylim()
    target = tmp_path / "both.png"
    code, _, _ = cli(["plot", dumps["bug"], dumps["dcp4"], "-o", target, "--step", "0", "--role", "draft",
                      "--spec-pos", "0"])
    image = matplotlib.image.imread(str(target))  # [height, width, channels]
    assert code == 0 and image.shape[0] > image.shape[1] / 2, "two rows of panels"


def test_report_is_styled_self_contained_html(dumps, tmp_path, cli):
    target = tmp_path / "report.html"
    code, out, _ = cli(["report", dumps["bug"], "-o", target, "--no-oracle"])
    page = target.read_text()
    assert code == 1 and page.startswith("<!doctype html>") and "<style>" in page
    assert "LAUNDERED CONSENSUS" in page and page.count("data:image/png;base64,") == 1, "a figure per verdict"
    assert "<table class='findings'>" in page and "<code>zero-heads</code>" in page
    for label in ("dump", "captured", "run", "written by", "report"):
        assert f"<dt>{label}</dt>" in page
    assert dumps["bug"] in page and f"by tensortap {tensortap.__version__}" in page
    assert not re.search(r"""(src|href)=['"](?!data:)""", page), "nothing loaded from outside the file"


def test_a_clean_report_has_an_overview_figure(dumps, tmp_path, cli):
    target = tmp_path / "clean.html"
    code, _, _ = cli(["report", dumps["dcp4"], "-o", target, "--no-oracle"])
    page = target.read_text()
    assert code == 0 and "clean</b>: no findings" in page and "<h2>Overview</h2>" in page
    assert page.count("data:image/png;base64,") == 2, "one overview figure per role"


def test_report_escapes_what_comes_from_the_files():
    from tensortap.analysis.findings import Finding
    from tensortap.report import _findings_table

    table = _findings_table([Finding("zero-heads", "error", "<script>alert(1)</script>", step=0, layer=1,
                                     role="draft", ranks=[1], heads=[2, 3])])
    assert "<script>" not in table and "&lt;script&gt;" in table and table.count("<tr>") == 2
