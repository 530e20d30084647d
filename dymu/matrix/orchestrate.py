"""The matrix loop: select cells, run each through a backend with a timeout, classify how it
ended, write its result, render the report. `nox -s matrix -- ...` calls `main`; so can
anything else (`python -m dymu.matrix.orchestrate --set quick`).

Standard library only: it runs in nox's own interpreter (`import dymu.matrix` imports no torch).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..errors import DymuError
from . import backends, cells, docker_env, outcome, report
from .digest import code_digest

ROOT = cells.ROOT


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting (the matrix prints one line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nox -s matrix --", description="Run matrix cells and write reports/matrix.*")
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
    p.add_argument(
        "--json", action="store_true", help="with --list: a JSON list (the GitHub workflow's plan job)"
    )
    p.add_argument("--jobs", type=int, default=1, help="cells run at once (default 1)")
    p.add_argument("--docker-base", default=None, help="docker backend: one base image for every cell (e.g. a "
                   "local one where no registry is reachable) instead of the CUDA image cells.toml names")  # fmt: skip
    p.add_argument("--docker-gpus", choices=["auto", "all", "none"], default="auto",
                   help="docker backend: pass the GPUs through (auto: when the engine has the nvidia runtime, "
                   "the NVIDIA hook or a CDI spec for nvidia.com/gpu)")  # fmt: skip
    p.add_argument("--gpus-per-cell", type=int, default=0,
                   help="give each running cell its own N GPUs (CUDA_VISIBLE_DEVICES locally, device ids in "
                   "Docker), so --jobs cells share the host's GPUs without sharing a GPU; 0 (default): every cell "
                   "sees every GPU")  # fmt: skip
    p.add_argument("--gpu-ids", type=lambda s: [g for g in s.split(",") if g], default=None,
                   help="with --gpus-per-cell: the GPU ids to hand out (default: every GPU nvidia-smi -L lists)")  # fmt: skip
    p.add_argument("--expect-gpu", action="store_true",
                   help="every selected cell must run on a GPU: one that sees no CUDA fails as gpu-missing "
                   "(the GPU workflow sets it)")  # fmt: skip
    return p


class GpuPool:
    """GPU ids handed out `per_cell` at a time to running cells, so cells running side by side never
    share a GPU; a cell waits until enough are free. Thread-safe (cells run in worker threads)."""

    def __init__(self, ids: list[str], per_cell: int) -> None:
        self.free, self.per_cell = list(ids), per_cell
        self._ready = threading.Condition()

    def take(self) -> list[str]:
        with self._ready:
            self._ready.wait_for(lambda: len(self.free) >= self.per_cell)
            taken, self.free = self.free[: self.per_cell], self.free[self.per_cell :]
            return taken

    def give(self, ids: list[str]) -> None:
        with self._ready:
            self.free.extend(ids)
            self._ready.notify_all()


def host_gpu_ids() -> list[str]:
    """The ids of this host's NVIDIA GPUs (`nvidia-smi -L`), none without the tool."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(listed.stdout.splitlines()) if line.startswith("GPU ")]


def gpu_pool(per_cell: int, ids: list[str] | None) -> GpuPool | None:
    """The pool for --gpus-per-cell (None when 0), or DymuError when it cannot give one cell its GPUs."""
    if per_cell < 0:
        raise DymuError(f"--gpus-per-cell {per_cell}: must be 0 (every cell sees every GPU) or more")
    if per_cell == 0:
        return None
    ids = host_gpu_ids() if ids is None else ids
    if len(set(ids)) != len(ids) or any(not re.fullmatch(r"[0-9]+|GPU-[0-9a-fA-F-]+", i) for i in ids):
        raise DymuError(f"--gpu-ids {','.join(ids)}: GPU indexes or GPU-<uuid> ids, each once")
    if len(ids) < per_cell:
        raise DymuError(f"--gpus-per-cell {per_cell}: this host has {len(ids)} GPU(s) ({', '.join(ids) or 'none'} "
                        "by nvidia-smi -L); give fewer per cell or name them with --gpu-ids")  # fmt: skip
    return GpuPool(ids, per_cell)


def select(data: dict[str, Any], set_name: str, names: list[str] | None) -> list[str]:
    """The cells to run, or ValueError naming an unknown set or cell."""
    if names is None:  # `core` or several sets, `core,broken`, in order without repeats
        names = []
        for one in filter(None, set_name.split(",")):
            if one not in data["sets"]:
                raise ValueError(f"unknown set {one!r}; sets: {', '.join(data['sets'])}")
            names += [n for n in data["sets"][one] if n not in names]
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


def cell_digest(cell: dict[str, Any]) -> str:
    """Everything in a cell's definition that can change its outcome (pins, companions, legacy,
    python, fault keys, expect): a result is fresh only for the same digest."""
    keep = {k: v for k, v in sorted(cell.items()) if k not in ("why", "image", "base_digest", "gpu_ids")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def is_fresh(previous: dict | None, code: str, cell: dict[str, Any]) -> bool:
    """A passing result for this code digest and this exact cell definition needs no re-run."""
    return bool(previous and previous.get("code") == code and previous.get("status") == "pass"
                and previous.get("cell_digest") == cell_digest(cell))  # fmt: skip


def _pins_only(name: str, cell: dict[str, Any]) -> dict[str, Any]:
    """A result for a cell whose runner wrote none (skipped, or died first): its pins, no stages."""
    return {"schema": 1, "cell": name, "stages": {},
            "versions": {key: cell[key] for key in ("python", "torch", "transformers")}}  # fmt: skip


def run_one(backend: backends.Backend, name: str, cell: dict[str, Any], timeout: float,
            known: list[str]) -> dict[str, Any]:  # fmt: skip
    """Run one cell and write its final result. The runner writes only its own partial file, so a
    straggler cannot overwrite what is recorded here."""
    out = backend.results / f"{name}.json"
    partial = backends.runner_file(backend.results, name)
    partial.unlink(missing_ok=True)
    started = time.time()
    log_path = backend.results.parent / "logs" / f"{name}.log"  # reports/logs, reports/docker/logs
    cannot = getattr(backend, "cannot_run", lambda cell: None)(cell)
    if cannot:  # e.g. no interpreter for the cell's Python here: skipped with the reason, not failed
        result = {**_pins_only(name, cell), "status": "skipped", "skip_reason": cannot,
                  "expected": cell.get("expect", "pass"), "as_expected": True, "runner_started": False,
                  "cell_digest": cell_digest(cell), "duration_s": 0.0}  # fmt: skip
        write_text_atomic(out, json.dumps(result, indent=1) + "\n")
        return result
    run = backend.run_cell(name, cell, log_path, timeout)
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    result = runner_evidence(_read(partial, started_after=started), name)
    started_runner = result is not None
    if (result is None or result.get("status") == "running" or run.timed_out or run.interrupted
            or run.returncode not in (0, 1)):  # fmt: skip
        failure_class, signature = outcome.classify(run.returncode, text, run.timed_out, run.oom_killed,
                                                    runner_started=started_runner, interrupted=run.interrupted,
                                                    refused=run.refused)  # fmt: skip
        result = result or _pins_only(name, cell)
        result.update(status="fail", failure={
            "class": failure_class, "signature": signature,
            "known": any(re.search(k, signature) for k in known), "log_tail": text[-3000:],
        })  # fmt: skip
    expected = cell.get("expect", "pass")
    result["expected"] = expected
    result["runner_started"] = started_runner
    # an expected crash counts only when this run's runner started (its partial file says so) and
    # then died: a cell that never got that far (install failure, a held lock) is not that crash
    result["as_expected"] = outcome.outcome(result) == expected and (expected != "crash" or started_runner)
    result["cell_digest"] = cell_digest(cell)
    if cell.get("gpu_ids"):
        result["gpu_ids"] = cell["gpu_ids"]
    result["duration_s"] = result.get("duration_s") or round(time.time() - started, 1)
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    return result


def runner_evidence(partial: dict | None, name: str) -> dict | None:
    """The runner's partial result when it proves the runner of this cell started in this run
    (`_read` already refused a file older than the run): its own cell name and start time."""
    if not isinstance(partial, dict) or partial.get("cell") != name or not partial.get("started"):
        return None
    return partial


class LockHeld(Exception):
    """Another matrix run holds this checkout's lock."""


@contextlib.contextmanager
def checkout_lock(root: Path) -> Iterator[None]:
    """One matrix run per checkout: a second one stops with a clear line instead of sharing venvs."""
    path = root / "reports" / ".matrix.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise LockHeld(f"another matrix run holds {path} ({handle.read().strip() or 'pid unknown'}); "
                             "wait for it or stop it") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> int:
    """Exit 0 when every selected cell ended as expected, 1 otherwise, 2 for bad arguments."""
    try:
        args = parser().parse_args(argv)
        data = cells.load()
        members = select(data, args.set, args.cells)
    except (argparse.ArgumentError, ValueError) as err:  # argparse's errors and TOML's are ValueErrors here
        log(f"matrix: error: {err}")
        return 2
    if args.list:
        print(json.dumps(members) if args.json else "\n".join(members))
        return 0
    if args.expect_gpu:  # part of each selected cell for this run, and of its digest: a CPU pass is not fresh
        data["cells"] = {n: {**c, "expect_gpu": n in members or c.get("expect_gpu", False)}
                         for n, c in data["cells"].items()}  # fmt: skip
    if args.jobs < 1:
        log("matrix: error: --jobs must be at least 1")
        return 2
    try:
        args.gpu_pool = gpu_pool(args.gpus_per_cell, args.gpu_ids)
    except DymuError as err:
        log(f"dymu: error: {err}")
        return 2
    options = {"base": args.docker_base, "gpus_choice": args.docker_gpus} if args.backend == "docker" else {}
    try:
        if args.backend == "docker":  # compose's and the backend's DYMU_* settings, before any build
            docker_env.check(os.environ)
        backend = backends.get_backend(args.backend, ROOT, **options)
    except DymuError as err:
        log(f"dymu: error: {err}")
        return 2
    why_not = backend.unavailable()
    if why_not:
        log(f"matrix: error: {why_not}")
        return 2
    try:
        with checkout_lock(ROOT), _sigterm_interrupts():
            return _run_members(data, members, backend, args, log)
    except LockHeld as err:
        log(f"matrix: error: {err}")
        return 2


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a CI job cancelled, `kill`) and SIGINT stop the run like Ctrl-C: cells killed,
    results kept. SIGINT gets the handler explicitly too: a run started from a background job
    inherits SIGINT ignored, and Python then never raises KeyboardInterrupt for it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_members(data: dict[str, Any], members: list[str], backend: backends.Backend, args: argparse.Namespace,
                 log: Callable[[str], None]) -> int:  # fmt: skip
    code = code_digest(ROOT)
    known = outcome.known_signatures()
    todo = []
    for name in members:
        cell = data["cells"][name]
        if not args.force and is_fresh(_read(backend.results / f"{name}.json"), code, cell):
            log(f"cell {name}: fresh result for this code and these versions, skipped (--force re-runs)")
        else:
            todo.append(name)

    def one(name: str) -> None:
        cell = data["cells"][name]
        log(f"cell {name}: python {cell['python']}, torch {cell['torch']} + transformers {cell['transformers']} "
            f"({backend.name}) ...")  # fmt: skip
        started = time.time()
        gpus = args.gpu_pool
        ids = gpus.take() if gpus else None
        try:
            result = run_one(backend, name, {**cell, "gpu_ids": ids} if ids else cell, args.timeout, known)
        finally:
            if ids:
                gpus.give(ids)
        log(
            f"cell {name}: {outcome.outcome(result)} (expected {result['expected']}) in {time.time() - started:.0f} s"
        )

    # cells are separate processes with their own venvs and files: N of them can run at once. A
    # signal reaches only this thread: on Ctrl-C it kills every running cell (LIVE.stop), whose
    # worker then records it as `interrupted`, drops the cells not started, and writes the report.
    backends.LIVE.reset()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs))
    try:
        for future in [pool.submit(one, name) for name in todo]:
            future.result()
    except KeyboardInterrupt:
        log("matrix: interrupted: killing the running cells")
        backends.LIVE.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        report.build(ROOT / "reports")
        log(f"wrote {ROOT / 'reports' / 'matrix.md'} (interrupted run)")
        return 130
    finally:
        pool.shutdown(wait=True)
    built = report.build(ROOT / "reports")
    log(f"wrote {ROOT / 'reports' / 'matrix.md'}")
    unexpected = [r["cell"] for r in built["summary"] if r["cell"] in members and not r["as_expected"]]
    if unexpected:
        log(f"matrix: unexpected outcomes: {', '.join(unexpected)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
