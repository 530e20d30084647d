"""nox sessions (uv backend): tests per cell, one session per matrix cell, the matrix, lint.

- `nox -s tests`: the unit tests in every cell of `[sets].tests` (envs/cells.toml);
- `nox -s "cell(latest)"`: build one cell and run the cell runner -> reports/cells/latest.json
  (the `tests` sessions run the runner too, after pytest);
- `nox -s golden`: regenerate the golden outputs in the reference cell;
- `nox -s matrix -- --set core` (default `core`; also `quick`, `broken`, `tests`): every cell of
  a set, each in its own nox process with a timeout, then reports/matrix.{json,md,html};
  `--force` re-runs cells whose result is fresh, `--timeout S` per cell, `--cells a,b` picks cells,
  `--backend local|docker` picks where cells run (dymu/matrix/backends.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import nox

ROOT = Path(__file__).parent
os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")  # use the interpreters present, never fetch one
nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "tests"]


def _load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


CELLS = _load_by_path("dymu_cells", ROOT / "dymu" / "matrix" / "cells.py").load(ROOT / "envs" / "cells.toml")
BACKENDS = _load_by_path("dymu_backends", ROOT / "dymu" / "matrix" / "backends.py")
ALL_CELLS = list(CELLS["cells"])
TEST_CELLS = CELLS["sets"]["tests"]
REPORTS = ROOT / "reports"


def install_cell(session: nox.Session, name: str) -> None:
    session.install(*BACKENDS.cell_requirements(CELLS["cells"][name]))
    session.install("-e", ".[test]")
    if CELLS["cells"][name].get("legacy"):
        session.install("--no-deps", *CELLS["cells"][name]["legacy"])


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
    """Unit tests in one matrix cell's stack, then that cell's matrix runner (-> reports/cells/)."""
    install_cell(session, cell)
    report = ROOT / ".nox" / f"junit-{cell}.xml"
    session.run("dymu", "doctor")
    session.run(
        "python", "-m", "pytest", f"--junitxml={report}", *session.posargs, success_codes=[0, 1, 5],
        env={"DYMU_CELL": cell},
    )  # fmt: skip
    totals = junit_totals(report)
    session.log(
        f"cell {cell}: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped"
    )
    runner_status = run_cell_runner(session, cell, success_codes=[0, 1])
    if totals["passed"] + totals["failed"] == 0:
        session.error(f"pytest collected no tests in cell {cell} (exit 5): a broken test tree, not a pass")
    if totals["failed"]:
        session.error(f"{totals['failed']} test(s) failed in cell {cell}")
    if runner_status != "pass":
        session.error(
            f"the matrix runner says {runner_status!r} in cell {cell}: see reports/cells/{cell}.json"
        )


def run_cell_runner(session: nox.Session, cell: str, **kwargs) -> str:
    """The cell runner in this session's env, with the cell's `env`; returns the result's status."""
    out = REPORTS / "cells" / f"{cell}.json"
    env = {k: str(v) for k, v in CELLS["cells"][cell].get("env", {}).items()}
    session.run("python", "-m", "dymu.matrix.runner", "--cell", cell, "--out", str(out), env=env, **kwargs)
    try:
        return json.loads(out.read_text())["status"]
    except (OSError, ValueError, KeyError):
        return "no result"


@nox.session(python="3.11")
@nox.parametrize("cell", ALL_CELLS, ids=ALL_CELLS)
def cell(session: nox.Session, cell: str) -> None:
    """Build one cell's environment and run the cell runner in it."""
    install_cell(session, cell)
    run_cell_runner(session, cell)


@nox.session(python="3.11")
def golden(session: nox.Session) -> None:
    """Regenerate tests/golden/reference.json in the reference cell; review the diff like code."""
    install_cell(session, "reference")
    session.run("python", "-m", "dymu.matrix.golden")


# ------------------------------------------------------------------------------ the matrix


def _fresh(path: Path, started_after: float | None = None) -> dict | None:
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if started_after is not None and path.stat().st_mtime < started_after:
        return None
    return result


@nox.session(python=False)
def matrix(session: nox.Session) -> None:
    """Run every cell of a set in isolation and write reports/matrix.{json,md,html}."""
    args = list(session.posargs)
    set_name = args[args.index("--set") + 1] if "--set" in args else "core"
    timeout = int(args[args.index("--timeout") + 1]) if "--timeout" in args else 1800
    force = "--force" in args
    members = args[args.index("--cells") + 1].split(",") if "--cells" in args else CELLS["sets"][set_name]
    unknown = [m for m in members if m not in CELLS["cells"]]
    if unknown:
        session.error(f"unknown cells: {', '.join(unknown)}")
    try:
        backend = BACKENDS.get_backend(
            args[args.index("--backend") + 1] if "--backend" in args else "local", ROOT
        )
    except ValueError as err:
        session.error(str(err))
    why_not = backend.unavailable()
    if why_not:
        session.error(why_not)
    code = _load_by_path("dymu_runner_digest", ROOT / "dymu" / "matrix" / "digest.py").code_digest(ROOT)
    outcome_rules = _load_by_path("dymu_outcome", ROOT / "dymu" / "matrix" / "outcome.py")
    known = outcome_rules.known_signatures(ROOT / "patches" / "fixes.toml")
    for name in members:
        expected = CELLS["cells"][name].get("expect", "pass")
        out = backend.results / f"{name}.json"
        previous = _fresh(out)
        pins = CELLS["cells"][name]
        if (not force and previous and previous.get("code") == code and previous.get("status") == "pass"
                and previous.get("versions", {}).get("transformers") == pins["transformers"]
                and previous.get("versions", {}).get("torch", "").split("+")[0] == pins["torch"]):  # fmt: skip
            session.log(
                f"cell {name}: fresh result for this code and these versions, skipped (--force re-runs)"
            )
            continue
        session.log(
            f"cell {name}: torch {pins['torch']} + transformers {pins['transformers']} ({backend.name}) ..."
        )
        started = time.time()
        log_path = backend.results.parent / "logs" / f"{name}.log"  # reports/logs, reports/docker/logs
        run = backend.run_cell(name, CELLS["cells"][name], log_path, timeout)
        timed_out, returncode = run.timed_out, run.returncode
        text = log_path.read_text(errors="replace")
        result = _fresh(out, started_after=started)
        if result is None or result.get("status") == "running" or timed_out or returncode not in (0, 1):
            failure_class, signature = outcome_rules.classify(returncode, text, timed_out)
            result = result or {"schema": 1, "cell": name, "versions": {"torch": pins["torch"],
                                "transformers": pins["transformers"]}, "stages": {}}  # fmt: skip
            result.update(status="fail", failure={
                "class": failure_class, "signature": signature,
                "known": any(re.search(k, signature) for k in known), "log_tail": text[-3000:],
            })  # fmt: skip
        outcome = outcome_rules.outcome(result)
        result["expected"] = expected
        result["as_expected"] = outcome == expected
        result["duration_s"] = result.get("duration_s") or round(time.time() - started, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        session.log(f"cell {name}: {outcome} (expected {expected}) in {time.time() - started:.0f} s")
    report = _load_by_path("dymu_report", ROOT / "dymu" / "matrix" / "report.py")
    data = report.build(REPORTS)
    session.log(f"wrote {REPORTS / 'matrix.md'}")
    unexpected = [r["cell"] for r in data["summary"] if r["cell"] in members and not r["as_expected"]]
    if unexpected:
        session.error(f"unexpected outcomes: {', '.join(unexpected)}")
