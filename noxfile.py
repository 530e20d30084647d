"""nox sessions (uv backend). The cells, their Pythons and their pins come from envs/cells.toml;
the matrix loop itself lives in dymu/matrix/orchestrate.py (this file only wires sessions to it).

- `nox -s tests`: the unit tests in every cell of `[sets].tests`, then that cell's runner
  (-> .nox/reports/cells/, never the committed reports/; `-- --update-reports` writes reports/cells/);
  the run ends with `TOTAL: N passed, N failed, N skipped` over the cells it ran;
- `nox -s "cell(latest)"`: build one cell and run the cell runner -> .nox/reports/cells/latest.json;
- `nox -s golden`: regenerate the golden outputs in the reference cell;
- `nox -s matrix -- --set core [--cells a,b] [--backend local|docker] [--timeout S] [--force] [--list]`;
- `nox -s docker_tests [-- --base TAG]`: the Docker backend against a real engine (needs one; builds
  the offline base docker/offline-base.sh makes when TAG, default dymu-base:bookworm, is missing);
- `nox -s lint`: ruff check + format check;
- `nox -s mutation [-- GROUP ...]`: mutmut over the core modules in the seed cell (not in `.ci/run`).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
from pathlib import Path

import nox

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).parent
sys.path.insert(0, str(ROOT))  # dymu.matrix needs no torch: nox's own interpreter runs it

from dymu.matrix import cells, junit, orchestrate  # noqa: E402

os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")  # use the interpreters present, never fetch one
nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "tests"]

CELLS = cells.load()
TEST_CELLS = CELLS["sets"]["tests"]
ALL_CELLS = list(CELLS["cells"])
TOOLS_PYTHON = CELLS["defaults"]["python"]
# uv's own setting for which PyTorch wheels to fetch (`cpu`, `cu126`, `auto`, ...). Unset (the
# default) installs torch from PyPI as pinned; `UV_TORCH_BACKEND=cpu nox -s tests` gets the small
# CPU wheels from PyTorch's index instead (needs that index to be reachable).
TORCH_BACKEND = os.environ.get("UV_TORCH_BACKEND", "")


def _python_and_cell(names: list[str]) -> list[tuple[str, str]]:
    return [(CELLS["cells"][name]["python"], name) for name in names]


def install_cell(session: nox.Session, name: str) -> None:
    cell = CELLS["cells"][name]
    if TORCH_BACKEND:
        session.log(f"torch wheels from uv's {TORCH_BACKEND!r} backend (UV_TORCH_BACKEND)")
    # passed explicitly so the setting reaches uv even where nox filters the environment
    env = {"UV_TORCH_BACKEND": TORCH_BACKEND} if TORCH_BACKEND else None
    session.install(*cells.requirements(cell), env=env)
    session.install("-e", ".[test]")
    if cell.get("legacy"):
        session.install("--no-deps", *cell["legacy"])


def run_cell_runner(session: nox.Session, name: str, out: Path | None = None, expect_gpu: bool = False,
                    **kwargs) -> str:  # fmt: skip
    """The cell runner in this session's env; returns the status its result records."""
    out = out or cells.results_dir(ROOT) / f"{name}.json"
    session.run("python", "-m", "dymu.matrix.runner", *cells.runner_args(name, {**CELLS["cells"][name], "expect_gpu": expect_gpu}, str(out), "local"),
                **kwargs)  # fmt: skip
    try:
        return json.loads(out.read_text())["status"]
    except (OSError, ValueError, KeyError):
        return "no result"


@nox.session(python=TOOLS_PYTHON)
def lint(session: nox.Session) -> None:
    """ruff check + format check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


RAN_JUNIT: list[Path] = []  # the junit files of the test cells this nox invocation ran


def _closing_total() -> None:
    """Runs at exit, after nox's own session summary, so the README's test command ends with the
    TOTAL line `.ci/run` prints (this run's cells only; report under .nox/reports)."""
    sys.stderr.flush()
    junit.closing(RAN_JUNIT, cells.results_dir(ROOT).parent)
    sys.stdout.flush()


@nox.session
@nox.parametrize("python,cell", _python_and_cell(TEST_CELLS), ids=TEST_CELLS)
def tests(session: nox.Session, cell: str) -> None:
    """Unit tests in one matrix cell's stack, then that cell's matrix runner (-> .nox/reports/cells/;
    `-- --update-reports`: reports/cells/, the committed results)."""
    args = list(session.posargs)
    update = "--update-reports" in args
    args = [a for a in args if a != "--update-reports"]
    install_cell(session, cell)
    report_xml = ROOT / ".nox" / f"junit-{cell}.xml"
    if not RAN_JUNIT:
        atexit.register(_closing_total)
    RAN_JUNIT.append(report_xml)
    report_xml.unlink(missing_ok=True)  # a stale file from an earlier run must not count
    session.run("dymu", "doctor")
    session.run("python", "-m", "pytest", f"--junitxml={report_xml}", *args, success_codes=[0, 1, 5])
    totals = junit.totals(report_xml)
    session.log(
        f"cell {cell}: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped"
    )
    out = cells.results_dir(ROOT, update_reports=update) / f"{cell}.json"
    runner_status = run_cell_runner(session, cell, out, success_codes=[0, 1])
    if totals["passed"] + totals["failed"] == 0:
        session.error(f"pytest collected no tests in cell {cell} (exit 5): a broken test tree, not a pass")
    if totals["failed"]:
        session.error(f"{totals['failed']} test(s) failed in cell {cell}")
    if runner_status != "pass":
        session.error(f"the matrix runner says {runner_status!r} in cell {cell}: see {out.relative_to(ROOT)}")


@nox.session
@nox.parametrize("python,cell", _python_and_cell(ALL_CELLS), ids=ALL_CELLS)
def cell(session: nox.Session, cell: str) -> None:
    """Build one cell's environment and run the cell runner in it (`-- --out F`: where the runner
    writes; the matrix loop passes its partial file and records the final result itself;
    `--expect-gpu`: the cell fails as gpu-missing without CUDA)."""
    out = Path(session.posargs[session.posargs.index("--out") + 1]) if "--out" in session.posargs else None
    install_cell(session, cell)
    run_cell_runner(session, cell, out, expect_gpu="--expect-gpu" in session.posargs)


@nox.session(python=CELLS["cells"]["reference"]["python"])
def golden(session: nox.Session) -> None:
    """Regenerate tests/golden/reference.json in the reference cell; review the diff like code."""
    install_cell(session, "reference")
    session.run("python", "-m", "dymu.matrix.golden")


@nox.session(python=CELLS["cells"]["seed"]["python"])
def mutation(session: nox.Session) -> None:
    """Mutation testing (mutmut) of the core modules in the seed cell's stack, with the fast tests
    that cover each; `-- merge scatter` runs only those groups. Not part of `.ci/run` (it takes
    tens of minutes); scores and surviving mutants: README, "Mutation testing"."""
    install_cell(session, "seed")
    session.install("mutmut==3.8.1")
    session.run("python", "scripts/mutation.py", *session.posargs)


DOCKER_BASE = "dymu-base:bookworm"  # what docker/offline-base.sh tags by default


@nox.session(python=TOOLS_PYTHON)
def docker_tests(session: nox.Session) -> None:
    """The Docker backend against a real engine (tests/test_docker_engine.py): a cell image built
    with the CA file, timeout, self-kill, OOM, a failed build, a GPU expectation without a GPU.
    Needs a reachable engine; `-- --base TAG` names a local base image, else the offline Debian
    base is built when missing (docker/offline-base.sh). Only the `docker` extra, pytest and the
    stdlib-only matrix code: no torch here. A skipped test fails the session (it would mean no engine)."""
    args = list(session.posargs)
    base = args.pop(args.index("--base") + 1) if "--base" in args else DOCKER_BASE
    args = [a for a in args if a != "--base"]
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["docker"]
    session.install(*extra, "pytest", "pyyaml", "packaging")
    session.install("--no-deps", "-e", ".")
    if subprocess.run(["docker", "image", "inspect", base], capture_output=True, check=False).returncode:
        session.run("bash", "docker/offline-base.sh", "--tag", base, external=True)
    report = ROOT / ".nox" / "junit-docker.xml"
    report.unlink(missing_ok=True)
    # --noconftest: tests/conftest.py builds torch fixtures; -p no:cacheprovider: the checkout stays clean
    session.run("python", "-m", "pytest", "--noconftest", "-p", "no:cacheprovider", f"--junitxml={report}", "-rs",
                "tests/test_docker_engine.py", *args, env={"DYMU_DOCKER_BASE": base}, success_codes=[0, 1])  # fmt: skip
    totals = junit.totals(report)
    if totals["failed"] or totals["skipped"] or not totals["passed"]:
        session.error(f"docker tests: {totals['passed']} passed, {totals['failed']} failed, "
                      f"{totals['skipped']} skipped (a skip here means no engine or no base image)")  # fmt: skip


@nox.session(python=False)
def matrix(session: nox.Session) -> None:
    """Run every cell of a set in isolation and write reports/matrix.{json,md,html}."""
    code = orchestrate.main(session.posargs, log=session.log)
    if code:
        session.error(f"the matrix exited with {code}")
