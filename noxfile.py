"""nox sessions (uv backend): tests per matrix cell, lint.

`nox -s tests` runs the unit tests in every cell of `[sets].tests` in envs/cells.toml;
`nox -s "tests(cell='reference')"` runs one.
"""

from __future__ import annotations

import os
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import nox

ROOT = Path(__file__).parent
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")  # use the interpreters present, never fetch one
nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "tests"]

CELLS = tomllib.loads((ROOT / "envs" / "cells.toml").read_text())
TEST_CELLS = CELLS["sets"]["tests"]


def cell_requirements(name: str) -> list[str]:
    """Pinned torch/transformers plus companion pins for one cell."""
    cell = CELLS["cells"][name]
    return [f"torch=={cell['torch']}", f"transformers=={cell['transformers']}", *cell.get("companions", [])]


def junit_totals(path: Path) -> dict[str, int]:
    """passed/failed/skipped counts from a pytest junit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {
        "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
        "failed": total["failures"] + total["errors"],
        "skipped": total["skipped"],
    }


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff check + format check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
@nox.parametrize("cell", TEST_CELLS, ids=TEST_CELLS)
def tests(session: nox.Session, cell: str) -> None:
    """Unit tests in one matrix cell's stack."""
    session.install(*cell_requirements(cell))
    session.install("-e", ".[test]")
    if CELLS["cells"][cell].get("legacy"):
        session.install("--no-deps", *CELLS["cells"][cell]["legacy"])
    report = ROOT / ".nox" / f"junit-{cell}.xml"
    session.run("dymu", "doctor")
    session.run(
        "python",
        "-m",
        "pytest",
        f"--junitxml={report}",
        *session.posargs,
        success_codes=[0, 1, 5],
        env={"DYMU_CELL": cell},
    )
    totals = junit_totals(report)
    session.log(
        f"cell {cell}: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped"
    )
    if totals["passed"] + totals["failed"] == 0:
        session.error(f"pytest collected no tests in cell {cell} (exit 5): a broken test tree, not a pass")
    if totals["failed"]:
        session.error(f"{totals['failed']} test(s) failed in cell {cell}")
