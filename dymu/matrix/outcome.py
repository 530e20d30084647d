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


def classify(returncode: int | None, log: str, timed_out: bool, oom_killed: bool = False,
             runner_started: bool = True, interrupted: bool = False,
             refused: tuple[str, str] | None = None) -> tuple[str, str]:  # fmt: skip
    """(class, signature) of a cell that left no finished result, from how its process ended:
    interrupted (the matrix run was stopped and killed it; no cell can expect this), timeout
    (killed at the limit), the backend's own refusal (gpu-missing, driver-too-old: `refused`, see
    backends.CellRun), oom (the kernel's or container's OOM kill, or an out-of-memory
    error the process reported), install-failure (the runner never started: the environment could
    not be built), else crash (a signal, or an exception in the runner)."""
    tail = [line for line in log.strip().splitlines() if line.strip()][-40:]
    last = tail[-1].strip() if tail else ""
    if interrupted:
        return "interrupted", "the matrix run was interrupted and killed this cell"
    if refused:
        return refused
    if timed_out:
        return "timeout", last
    memory = [
        line.strip() for line in tail if re.search(r"CUDA out of memory|OutOfMemoryError|MemoryError", line)
    ]
    if oom_killed or memory:
        return "oom", memory[-1] if memory else "killed by the kernel's OOM killer"
    if not runner_started:
        errors = [line.strip() for line in tail if "error" in line.lower()]
        return "install-failure", errors[-1] if errors else last
    if returncode is not None and (returncode < 0 or returncode > 128):
        number = -returncode if returncode < 0 else returncode - 128
        return "crash", f"killed by signal {number}"
    errors = [line.strip() for line in tail if re.match(r"^\w+(Error|Exception)\b", line.strip())]
    return "crash", errors[-1] if errors else last
