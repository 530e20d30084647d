"""pytest junit totals: per file for the nox `tests` sessions, and one closing line over all
cells for CI (`python -m dymu.matrix.junit .nox/junit-*.xml`: 'TOTAL: N passed, N failed, N
skipped'; exit 5, pytest's "no tests collected", when no test ran at all, 1 when any failed).

Standard library only (runs in nox's interpreter).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from . import report


def totals(path: str | Path) -> dict[str, int]:
    """passed / failed (failures + errors) / skipped of one junit file."""
    root = ET.parse(path).getroot()
    passed = failed = skipped = 0
    for suite in [root] if root.tag == "testsuite" else list(root):
        n, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        passed += n - f - e - s
        failed += f + e
        skipped += s
    return {"passed": passed, "failed": failed, "skipped": skipped}


def main(paths: list[str]) -> int:
    passed = failed = skipped = 0
    for path in paths:
        try:
            count = totals(path)
        except (OSError, ET.ParseError) as err:
            print(f"ci: cannot read {path}: {err}")
            failed += 1
            continue
        passed, failed, skipped = (
            passed + count["passed"],
            failed + count["failed"],
            skipped + count["skipped"],
        )
    print(f"TOTAL: {passed} passed, {failed} failed, {skipped} skipped")
    if passed + failed == 0:
        print("ci: no tests ran (pytest exit 5 semantics): treated as a failure")
        return 5
    return 1 if failed else 0


def closing(paths: list[Path], reports: Path) -> int:
    """The end of `nox -s tests`: render the test cells' results under `reports` (a build folder,
    never the committed reports/) and print the TOTAL line last, as `.ci/run` does."""
    if (reports / "cells").is_dir():
        report.build(reports)
        print(f"test cells' report: {reports / 'matrix.md'}")
    return main([str(p) for p in paths])  # a cell that left no junit file counts as a failure


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
