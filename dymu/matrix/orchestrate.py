"""The matrix loop: select cells, run each through a backend with a timeout, classify how it
ended, write its result, render the report. `nox -s matrix -- ...` calls `main`; so can
anything else (`python -m dymu.matrix.orchestrate --set quick`).

Standard library only: it runs in nox's own interpreter (`import dymu.matrix` imports no torch).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from . import backends, cells, outcome, report
from .digest import code_digest

ROOT = cells.ROOT


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nox -s matrix --", description="Run matrix cells and write reports/matrix.*"
    )
    p.add_argument("--set", default="core", help="a set of envs/cells.toml [sets] (default: core)")
    p.add_argument(
        "--cells",
        type=lambda s: [c for c in s.split(",") if c],
        help="comma-separated cells instead of a set",
    )
    p.add_argument("--backend", default="local", choices=sorted(backends.BACKENDS))
    p.add_argument("--timeout", type=float, default=1800, help="seconds per cell (default 1800)")
    p.add_argument("--force", action="store_true", help="re-run cells whose result is fresh")
    p.add_argument("--list", action="store_true", help="print the selected cells and exit")
    return p


def select(data: dict[str, Any], set_name: str, names: list[str] | None) -> list[str]:
    """The cells to run, or ValueError naming an unknown set or cell."""
    if names is None:
        if set_name not in data["sets"]:
            raise ValueError(f"unknown set {set_name!r}; sets: {', '.join(data['sets'])}")
        names = data["sets"][set_name]
    unknown = [n for n in names if n not in data["cells"]]
    if unknown:
        raise ValueError(f"unknown cells: {', '.join(unknown)}")
    return list(names)


def _read(path: Path, started_after: float | None = None) -> dict | None:
    if not path.is_file() or (started_after is not None and path.stat().st_mtime < started_after):
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_fresh(previous: dict | None, code: str, cell: dict[str, Any]) -> bool:
    """A passing result for this code digest and these versions needs no re-run."""
    if not previous or previous.get("code") != code or previous.get("status") != "pass":
        return False
    versions = previous.get("versions", {})
    return (
        versions.get("transformers") == cell["transformers"]
        and versions.get("torch", "").split("+")[0] == cell["torch"]
    )


def run_one(backend: backends.Backend, name: str, cell: dict[str, Any], timeout: float,
            known: list[str]) -> dict[str, Any]:  # fmt: skip
    """Run one cell and return its finished result (also written to the backend's results)."""
    out = backend.results / f"{name}.json"
    started = time.time()
    log_path = backend.results.parent / "logs" / f"{name}.log"  # reports/logs, reports/docker/logs
    run = backend.run_cell(name, cell, log_path, timeout)
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    result = _read(out, started_after=started)
    if result is None or result.get("status") == "running" or run.timed_out or run.returncode not in (0, 1):
        failure_class, signature = outcome.classify(run.returncode, text, run.timed_out)
        result = result or {"schema": 1, "cell": name, "stages": {},
                            "versions": {"torch": cell["torch"], "transformers": cell["transformers"]}}  # fmt: skip
        result.update(status="fail", failure={
            "class": failure_class, "signature": signature,
            "known": any(re.search(k, signature) for k in known), "log_tail": text[-3000:],
        })  # fmt: skip
    expected = cell.get("expect", "pass")
    result["expected"] = expected
    result["as_expected"] = outcome.outcome(result) == expected
    result["duration_s"] = result.get("duration_s") or round(time.time() - started, 1)
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> int:
    """Exit 0 when every selected cell ended as expected, 1 otherwise, 2 for bad arguments."""
    args = parser().parse_args(argv)
    data = cells.load()
    try:
        members = select(data, args.set, args.cells)
    except ValueError as err:
        log(f"matrix: error: {err}")
        return 2
    if args.list:
        print("\n".join(members))
        return 0
    backend = backends.get_backend(args.backend, ROOT)
    why_not = backend.unavailable()
    if why_not:
        log(f"matrix: error: {why_not}")
        return 2
    code = code_digest(ROOT)
    known = outcome.known_signatures()
    for name in members:
        cell = data["cells"][name]
        if not args.force and is_fresh(_read(backend.results / f"{name}.json"), code, cell):
            log(f"cell {name}: fresh result for this code and these versions, skipped (--force re-runs)")
            continue
        log(f"cell {name}: python {cell['python']}, torch {cell['torch']} + transformers {cell['transformers']} "
            f"({backend.name}) ...")  # fmt: skip
        started = time.time()
        result = run_one(backend, name, cell, args.timeout, known)
        log(
            f"cell {name}: {outcome.outcome(result)} (expected {result['expected']}) in {time.time() - started:.0f} s"
        )
    built = report.build(ROOT / "reports")
    log(f"wrote {ROOT / 'reports' / 'matrix.md'}")
    unexpected = [r["cell"] for r in built["summary"] if r["cell"] in members and not r["as_expected"]]
    if unexpected:
        log(f"matrix: unexpected outcomes: {', '.join(unexpected)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
