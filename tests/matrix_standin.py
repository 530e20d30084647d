"""A whole matrix run whose cells are stand-ins, for the real-process interrupt test in
tests/test_matrix.py: `python tests/matrix_standin.py ROOT PIDS [orchestrate args]` runs
`orchestrate.main` with its ROOT (reports, lock) in ROOT and the local backend replaced by one
whose cell is a real process group started by `backends.run_logged`, as the real backend does.
The stand-in runner writes its partial file the way the runner does (cell, started, status
running), starts a child, writes both PIDs to PIDS/<cell>, and hangs: a cell in mid-run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from dymu.matrix import backends, orchestrate

RUNNER = """
import datetime, json, os, subprocess, sys, time
from dymu.atomic import write_text_atomic
name, out, pids = sys.argv[1:4]
started = datetime.datetime.now(datetime.timezone.utc).isoformat()
write_text_atomic(out, json.dumps({"schema": 1, "cell": name, "started": started, "status": "running",
                                   "stages": {}}))
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
write_text_atomic(os.path.join(pids, name), f"{os.getpid()} {child.pid}")
print("stand-in runner started", flush=True)
time.sleep(600)
"""


class StandIn(backends.LocalBackend):
    """The local backend with the stand-in runner instead of `nox -s cell(...)`."""

    pids: Path = Path()

    def unavailable(self) -> str | None:
        return None

    def run_cell(self, name: str, cell: dict[str, Any], log_path: Path, timeout: float) -> backends.CellRun:
        out = backends.runner_file(self.results, name)
        out.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-c", RUNNER, name, str(out), str(self.pids)]
        return backends.run_logged(command, log_path, timeout, self.root)


def main(argv: list[str]) -> int:
    root, pids, *args = argv
    orchestrate.ROOT = Path(root)
    StandIn.pids = Path(pids)
    backends.BACKENDS["local"] = StandIn
    return orchestrate.main(args, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
