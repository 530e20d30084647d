"""Failure classes for a cell whose runner left no finished result (standard library only)."""

from __future__ import annotations

import re

from ..compat.registry import fixes


def known_signatures() -> list[str]:
    """The documented error signatures of every fix (patches/fixes.toml)."""
    return [fix.error for fix in fixes().values()]


def outcome(result: dict) -> str:
    """One word for a cell's result, compared with its `expect`: pass, or the failure class with
    `/known` when its signature is a fix's documented error (e.g. `stage-failure/known`)."""
    failure = result.get("failure")
    if not failure:
        return str(result.get("status", "?"))
    return failure.get("class", "fail") + ("/known" if failure.get("known") else "")


def classify(returncode: int | None, log: str, timed_out: bool) -> tuple[str, str]:
    """(class, signature): timeout / oom / crash / install-failure, from the exit and the log."""
    tail = [line for line in log.strip().splitlines() if line.strip()][-40:]
    if timed_out:
        return "timeout", tail[-1].strip() if tail else ""
    if re.search(r"CUDA out of memory|OutOfMemoryError|Cannot allocate memory", log):
        return "oom", next(line for line in reversed(tail) if re.search(r"memory", line)).strip()
    if returncode in (-9, 137) or re.search(r"\bKilled\b|signal 9|SIGKILL|-9\b", log):
        return "crash", "killed (SIGKILL)"
    if re.search(r"No solution found|ResolutionImpossible|Failed to (build|download|fetch)", log):
        return "install-failure", next(
            (line for line in reversed(tail) if "error" in line.lower()), tail[-1]
        ).strip()
    errors = [line.strip() for line in tail if re.match(r"^\w+(Error|Exception)\b", line.strip())]
    return "crash", errors[-1] if errors else (tail[-1].strip() if tail else "")
