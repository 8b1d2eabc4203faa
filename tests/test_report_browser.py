"""The bug's report in a real browser: headless Chromium renders it offline, the verdict text is in
its DOM, and its screenshot is not blank and shows the figure.

Skipped where Chromium is absent, except under CI=true, where it must run (Debian: apt-get install -y chromium).
"""

import os
import shutil
import subprocess

import numpy as np
import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1"]


def chromium() -> str:
    found = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no chromium on PATH: the report's browser test must run in CI "
                        "(apt-get install -y chromium)")
        pytest.skip("no chromium on PATH (apt-get install -y chromium)")
    return found


def browse(browser: str, profile, *args) -> subprocess.CompletedProcess:
    return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, timeout=120)


def test_bug_report_renders_with_verdict_and_figure(dumps, tmp_path, cli):
    import matplotlib.image

    browser = chromium()
    page = tmp_path / "report.html"
    code, _, _ = cli(["report", dumps["bug"], "-o", page, "--no-oracle"])
    assert code == 1
    url = page.as_uri()

    dom = browse(browser, tmp_path / "profile-dom", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr.decode()[-2000:]
    text = dom.stdout.decode()
    assert "LAUNDERED CONSENSUS" in text and "draft layer 78: ranks 1-3 emit all-zero attention" in text
    assert "<img" in text and "data:image/png;base64," in text

    shot = tmp_path / "report.png"
    done = browse(browser, tmp_path / "profile-shot", "--window-size=1280,1800", f"--screenshot={shot}", url)
    assert done.returncode == 0 and shot.exists(), done.stderr.decode()[-2000:]
    image = matplotlib.image.imread(str(shot))[..., :3]  # [height, width, 3] floats in 0..1
    assert image.shape[:2] == (1800, 1280)
    assert image.std() > 0.05, "the screenshot is not blank"
    dark = (image.mean(axis=-1) < 0.35).mean()  # text and lines
    assert 0.005 < dark < 0.5, f"{dark:.4f} of the pixels are dark"
    reddish = ((image[..., 0] > 0.6) & (image[..., 1] < 0.35) & (image[..., 2] < 0.35)).sum()
    assert reddish > 200, "the verdict's red label is drawn"
    # The figure: the bug's per-head panel draws rank 0's line in matplotlib's first colour (tab:blue),
    # and rank 0's bar of the o_proj share; both sit below the verdict.
    blue = (np.abs(image - np.array([0x1F, 0x77, 0xB4]) / 255).max(axis=-1) < 0.08)  # [height, width]
    rows = np.flatnonzero(blue.any(axis=1))
    assert blue.sum() > 2000 and rows.size, "the figure is on the screenshot"
    red_rows = np.flatnonzero(((image[..., 0] > 0.6) & (image[..., 1] < 0.35) & (image[..., 2] < 0.35)).any(axis=1))
    assert rows.min() > red_rows.min(), "the figure comes after the verdict"
