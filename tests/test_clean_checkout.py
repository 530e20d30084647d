"""Test runs leave the checkout clean (issue 13, item 7): `nox -s tests` writes its cell results
and report under .nox/reports (ignored by git), ends with the TOTAL line, and `.ci/run` prints the
whole report of those cells; only an explicit update writes the committed reports/."""

from __future__ import annotations

import ast
import json
import pathlib
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from dymu.matrix import cells, junit

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def test_results_dir_is_a_build_folder_unless_updating() -> None:
    test_dir = cells.results_dir(ROOT)
    assert test_dir.relative_to(ROOT).parts[:2] == (".nox", "reports")
    assert cells.results_dir(ROOT, update_reports=True) == ROOT / "reports" / "cells"
    if shutil.which("git") is None or _git("rev-parse").returncode != 0:
        pytest.skip("not a git checkout: the ignore rules cannot be asked")
    assert _git("check-ignore", "-q", str(test_dir / "latest.json")).returncode == 0, (
        "test results must be ignored"
    )
    assert _git("check-ignore", "-q", str(ROOT / "reports" / "cells" / "latest.json")).returncode == 1


def test_nox_sessions_name_no_reports_path_of_their_own() -> None:
    """The noxfile takes every result path from cells.results_dir, so no session writes a tracked
    report by default; only `--update-reports` switches the tests session to reports/cells."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert not [s for s in literals if re.fullmatch(r"reports(/.*)?", s)], "a hard-coded reports/ path"
    session = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "tests")
    calls = [ast.unparse(n) for n in ast.walk(session) if isinstance(n, ast.Call)]
    assert any(c.startswith("cells.results_dir(ROOT, update_reports=update)") for c in calls)
    assert "--update-reports" in ast.unparse(session)


def _junit(path: pathlib.Path, tests: int, failures: int, skipped: int) -> None:
    suite = ET.Element(
        "testsuite", tests=str(tests), failures=str(failures), errors="0", skipped=str(skipped)
    )
    ET.ElementTree(suite).write(path)


def _cell_result(name: str) -> dict:
    return {"cell": name, "status": "pass", "versions": {"torch": "2.15.0", "transformers": "5.24.0"},
            "stages": {"import": {"status": "pass"}}}  # fmt: skip


def test_closing_renders_the_build_report_and_ends_with_total(tmp_path, capsys) -> None:
    reports = tmp_path / ".nox" / "reports"
    (reports / "cells").mkdir(parents=True)
    (reports / "cells" / "latest.json").write_text(json.dumps(_cell_result("latest")))
    a, b = tmp_path / "junit-a.xml", tmp_path / "junit-b.xml"
    _junit(a, tests=5, failures=0, skipped=1)
    _junit(b, tests=3, failures=1, skipped=0)
    assert junit.closing([a, b], reports) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "TOTAL: 6 passed, 1 failed, 1 skipped"
    assert "| latest |" in (reports / "matrix.md").read_text()
    assert not (tmp_path / "reports").exists()
    # a cell that left no junit file (it failed to install) is a failure, not a silent pass
    assert junit.closing([a, tmp_path / "junit-missing.xml"], reports) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1] == "TOTAL: 4 passed, 1 failed, 1 skipped"
    assert junit.closing([a], reports) == 0


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash to run .ci/run's report line")
def test_ci_run_prints_every_test_cell_and_writes_no_tracked_report(tmp_path) -> None:
    """The report line of .ci/run, run as written on 45 cells: every cell is printed (no cut-off
    at a fixed line) and the report lands in .nox/reports, not reports/."""
    line = next(ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if "dymu.matrix.report" in ln)
    folder = tmp_path / ".nox" / "reports" / "cells"
    folder.mkdir(parents=True)
    names = [f"cell{i:02d}" for i in range(45)]
    for name in names:
        (folder / f"{name}.json").write_text(json.dumps(_cell_result(name)))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    shell_line = line.replace("python ", f"{sys.executable} ", 1)
    done = subprocess.run(["bash", "-c", shell_line], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all(f"| {name} |" in done.stdout for name in names), "the summary was cut off"
    assert "# Compatibility matrix" not in done.stdout  # the header is skipped, the table is not
    assert (tmp_path / ".nox" / "reports" / "matrix.md").exists() and not (tmp_path / "reports").exists()


def test_recorded_properties_raise_no_pytest_warning(tmp_path) -> None:
    """The suite's record_property calls, under the project's pytest settings and --junitxml as
    the nox session passes it, give no PytestWarning and land in the junit file."""
    (tmp_path / "test_prop.py").write_text("def test_p(record_property):\n    record_property('k', 1.5)\n")
    xml = tmp_path / "junit.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
         "-p", "no:cacheprovider", f"--junitxml={xml}", str(tmp_path / "test_prop.py")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PytestWarning" not in done.stdout + done.stderr
    props = ET.parse(xml).getroot().iter("property")
    assert [(p.get("name"), p.get("value")) for p in props] == [("k", "1.5")]
