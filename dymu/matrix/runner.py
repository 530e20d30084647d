"""The cell runner: runs inside one matrix cell's environment and writes one JSON result.

Stages: import (exact installed versions), fixes (verify + negative control of every fix),
inference + golden (both families x both serializations on the tiny model, compared with
the reference cell's outputs), bench (stock vs DyMU on the tiny model, same process),
full-size (GPU cells only, else n.a.: the LLaVA-1.5-7B architecture with random weights,
see full_size.py). The
JSON is rewritten atomically after every stage, so a crash or timeout leaves the stages
that finished.

Run: `python -m dymu.matrix.runner --cell latest --out reports/cells/latest.json` (the matrix passes
the cell's fault keys from envs/cells.toml as `--disable-fixes a,b` and `--self-kill`, and
`--expect-gpu` for a cell that must run on a GPU: without CUDA it fails at once as `gpu-missing`
instead of passing on the CPU).

Standard library (+ the patch data) here; the heavy stages live in `stages.py`, whose import is
the import stage: a stack that cannot import torch or transformers still leaves a result saying so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import re
import signal
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..compat.registry import disable, disabled, fixes
from .digest import GOLDEN_FILE, code_digest
from .runner_errors import error_entry

SCHEMA = 1
PACKAGES = ("torch", "transformers", "tokenizers", "huggingface-hub", "accelerate", "numpy", "safetensors",
            "pillow", "llava-torch", "sentencepiece", "protobuf")  # fmt: skip


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _stage_errors(stage: dict[str, Any]) -> list[str]:
    """The error texts a failed stage recorded (its own, or its failing fixes' and cases')."""
    texts = [stage["error"]] if "error" in stage else []
    texts += [f.get("detail", "") for f in stage.get("fixes", []) if f.get("verify") == "failed"]
    for case in stage.get("cases", {}).values():
        if case.get("status") == "fail":
            texts += [case["error"]] if "error" in case else case.get("problems", [])
    return texts or ["(no error text)"]


def failure_summary(stages: dict[str, Any], failed: list[str]) -> dict[str, Any]:
    """Class `stage-failure`; known when every error matches a fix's documented signature."""
    signatures = [fix.error for fix in fixes().values()]
    texts = [t for name in failed for t in _stage_errors(stages[name])]
    matched = {t: next((s for s in signatures if re.search(s, t)), None) for t in texts}
    return {"class": "stage-failure", "signature": texts[0][:300], "known": all(matched.values()),
            "stages": failed}  # fmt: skip


def gpu_missing(torch: Any) -> str:
    """What a cell that expects a GPU and sees none records: enough to tell a CPU-only torch wheel
    from a container that was given no GPU."""
    built = torch.version.cuda or "none (a CPU-only torch wheel)"
    visible = os.environ.get("NVIDIA_VISIBLE_DEVICES", "unset")
    return (f"torch.cuda.is_available() is False in a cell that expects a GPU (torch {torch.__version__}, "
            f"CUDA build {built}, NVIDIA_VISIBLE_DEVICES={visible})")  # fmt: skip


def gpu_identity(torch: Any) -> dict[str, Any]:
    """Which GPU a cell ran on (cells run side by side, one GPU each): the visible-devices setting
    it was given, the card's name and its UUID (the same UUID in two cells means a shared GPU)."""
    props = torch.cuda.get_device_properties(0)
    return {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "name": props.name,
            "uuid": str(getattr(props, "uuid", "unknown")), "count": torch.cuda.device_count()}  # fmt: skip


def run(cell: str, out: Path, golden: Path, bench: bool = True, full_size: bool = True, backend: str = "local",
        disable_fixes: tuple[str, ...] = (), self_kill: bool = False,
        expect_gpu: bool = False) -> dict[str, Any]:  # fmt: skip
    result: dict[str, Any] = {
        "schema": SCHEMA, "cell": cell, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code": code_digest(), "versions": versions(), "status": "running", "stages": {}, "backend": backend,
    }  # fmt: skip

    def save() -> None:
        write_text_atomic(out, json.dumps(result, indent=1) + "\n")

    t0 = time.perf_counter()
    save()
    if self_kill:  # the matrix's failure-isolation check
        os.kill(os.getpid(), signal.SIGKILL)
    stages: Any = None
    try:
        stages = importlib.import_module("dymu.matrix.stages")  # torch, transformers, dymu: the stage
        disable(disable_fixes)  # an unknown name fails this stage: a typo must not pass vacuously
        result["disabled_fixes"] = sorted(disabled())
        result["where"] = "gpu" if stages.torch.cuda.is_available() else "cpu"
        if result["where"] == "gpu":
            result["gpu"] = gpu_identity(stages.torch)
        result["stages"]["import"] = {"status": "pass"}
    except Exception as err:
        result["stages"]["import"] = {"status": "fail", **error_entry(err)}
    if expect_gpu and result["stages"]["import"]["status"] == "pass" and result["where"] != "gpu":
        result["stages"]["gpu"] = {"status": "fail", "error": gpu_missing(stages.torch)}  # nothing else runs
    save()
    if all(s["status"] == "pass" for s in result["stages"].values()):
        steps = [
            ("fixes", stages.stage_fixes),
            ("inference+golden", lambda: stages.stage_inference_and_golden(golden)),
        ]
        if bench:
            steps.append(("bench", stages.stage_bench))
        if full_size:
            steps.append(("full-size", stages.stage_full_size))
            if stages.torch.cuda.is_available():  # `dymu bench` at the real shapes, random weights
                steps.append(("bench-full", lambda: stages.stage_bench("random:llava-1.5-7b", "cuda", "bfloat16",
                                                                        limit=6, max_new_tokens=16)))  # fmt: skip
        for name, fn in steps:
            try:
                value = fn()
                if name == "inference+golden":
                    result["stages"]["inference"], result["stages"]["golden"] = value
                else:
                    result["stages"][name] = value
            except Exception as err:
                result["stages"][name] = {"status": "fail", **error_entry(err)}
            save()
    failed = [n for n, s in result["stages"].items() if s["status"] == "fail"]
    result["status"] = "fail" if failed else "pass"
    result["failed_stages"] = failed
    if failed:
        result["failure"] = failure_summary(result["stages"], failed)
        if "gpu" in failed:
            result["failure"].update({"class": "gpu-missing", "known": False})
    result["duration_s"] = round(time.perf_counter() - t0, 1)
    save()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dymu.matrix.runner", description=__doc__.splitlines()[0])
    parser.add_argument("--cell", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--golden", type=Path, default=GOLDEN_FILE)
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--no-full-size", action="store_true", help="skip the full-size GPU stage")
    parser.add_argument("--backend", default="local", help="where the matrix ran this cell (recorded)")
    parser.add_argument(
        "--disable-fixes", default="", help="comma-separated fixes to switch off (broken cells)"
    )
    parser.add_argument(
        "--self-kill", action="store_true", help="SIGKILL itself once started (failure isolation)"
    )
    parser.add_argument(
        "--expect-gpu", action="store_true", help="fail as gpu-missing when CUDA is not available"
    )
    args = parser.parse_args(argv)
    result = run(args.cell, args.out, args.golden, bench=not args.no_bench, full_size=not args.no_full_size,
                 backend=args.backend, disable_fixes=tuple(n for n in args.disable_fixes.split(",") if n.strip()),
                 self_kill=args.self_kill, expect_gpu=args.expect_gpu)  # fmt: skip
    print(
        f"cell {args.cell}: {result['status']} ({', '.join(result['failed_stages']) or 'all stages passed'})"
    )
    return 0 if result["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
