"""Where a matrix cell runs. The matrix loop (noxfile.py `matrix`) only knows this interface:
build the cell's environment, run the cell runner in it with a timeout, leave the runner's JSON
at reports/cells/<cell>.json and the combined output in a log. Everything else (freshness,
failure classes, the report) is the same whichever backend ran the cell.

Standard library only: the noxfile loads this file by path, before any cell env exists.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass
class CellRun:
    """How the backend's process ended (the runner's JSON says how the stages went)."""

    returncode: int | None
    timed_out: bool


class Backend(Protocol):
    name: str

    def unavailable(self) -> str | None:
        """None when this backend can run cells here, else a one-line reason and fix."""

    def run_cell(self, name: str, cell: dict[str, Any], log_path: Path, timeout: float) -> CellRun:
        """Build the cell's environment, run `python -m dymu.matrix.runner` in it, log everything."""


def run_logged(command: list[str], log_path: Path, timeout: float, cwd: Path) -> CellRun:
    """Run `command` with stdout+stderr into `log_path`; a timeout kills it and is reported."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        try:
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=cwd)
        except subprocess.TimeoutExpired:
            return CellRun(None, True)
    return CellRun(proc.returncode, False)


@dataclass
class LocalBackend:
    """This machine: one uv venv per cell, built by the nox session `cell(<name>)` in its own
    process (a crash, hang or OOM there cannot take the matrix loop down)."""

    root: Path
    name: str = "local"

    def unavailable(self) -> str | None:
        if shutil.which("uv") is None:
            return "the local backend needs uv on PATH (python -m pip install uv)"
        return None

    def run_cell(self, name: str, cell: dict[str, Any], log_path: Path, timeout: float) -> CellRun:
        return run_logged([sys.executable, "-m", "nox", "-s", f"cell({name})"], log_path, timeout, self.root)


BACKENDS = {"local": LocalBackend}


def get_backend(name: str, root: Path) -> Backend:
    """The named backend, or ValueError naming the ones that exist."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](root)
