"""The matrix report as a reader sees it: the headline line, links to failure logs, and the HTML
page rendered by a real headless browser (a screenshot, and no console errors)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageStat
from test_matrix import _cell, _failed, _write_cells

from dymu.matrix import report

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0"]  # fmt: skip


def _matrix(tmp_path: Path) -> Path:
    """A reports folder with a pass, an expected crash, an unexpected failure with its log, and an
    unexpected failure without one."""
    _write_cells(tmp_path / "cells", {
        "good": _cell("good", "pass", "yes", "failed as documented"),
        "killed": _failed("killed", "crash", "killed by signal 9", "crash"),
        "bad": _failed("bad", "stage-failure", "TypeError: <boom> & co"),
        "lost": _failed("lost", "timeout", ""),
    })  # fmt: skip
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "bad.log").write_text("the log of bad\n")
    report.build(tmp_path)
    return tmp_path


def test_the_report_opens_with_one_line_on_what_behaved_as_expected(tmp_path) -> None:
    folder = _matrix(tmp_path)
    lines = (folder / "matrix.md").read_text().splitlines()
    assert lines[2] == ("**2 of 4 cells behaved as expected (1 of them failing on purpose: killed); "
                        "not as expected: bad (fail (unexpected)), lost (fail (unexpected)).**")  # fmt: skip
    page = (folder / "matrix.html").read_text()
    assert "2 of 4 cells behaved as expected" in page.split("<table>")[0]
    all_good = [{"cell": "a", "status": "pass", "as_expected": True, "expected": "pass"}]
    assert report.headline(all_good) == "1 of 1 cells behaved as expected; none did otherwise."


def test_failures_link_to_their_logs_where_the_log_exists(tmp_path) -> None:
    folder = _matrix(tmp_path)
    markdown = (folder / "matrix.md").read_text()
    assert "([log](logs/bad.log))" in markdown and "logs/lost.log" not in markdown
    page = (folder / "matrix.html").read_text()
    assert page.count("href='logs/bad.log'") == 2 and "lost.log" not in page  # table row and failure list
    assert "&lt;boom&gt; &amp; co" in page and "<boom>" not in page  # signatures are escaped


@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium here (.ci/run installs Debian's chromium)")
def test_the_page_renders_in_a_real_browser_without_console_errors(tmp_path) -> None:
    folder = _matrix(tmp_path)
    planted = tmp_path / "planted.html"  # negative control: the console check must see this one
    planted.write_text("<!doctype html><title>x</title><script>console.error('planted'); nope();</script>")

    def render(page: Path, shot: Path) -> list[str]:
        done = subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                               "--window-size=1400,900", page.as_uri()],
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        return [line for line in done.stderr.splitlines() if ":CONSOLE" in line]

    assert any("planted" in line for line in render(planted, tmp_path / "planted.png"))
    shot = tmp_path / "matrix.png"
    assert render(folder / "matrix.html", shot) == []
    image = Image.open(shot).convert("L")
    assert image.size == (1400, 900)
    assert ImageStat.Stat(image).stddev[0] > 5  # something was drawn, not a blank page
