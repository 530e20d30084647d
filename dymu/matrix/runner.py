"""The cell runner: runs inside one matrix cell's environment and writes one JSON result.

Stages: import (exact installed versions), fixes (verify + negative control of every fix),
inference + golden (both families x both serializations on the tiny model, compared with
the reference cell's outputs), bench (stock vs DyMU on the tiny model, same process),
full-size (GPU cells only, else n.a.: the LLaVA-1.5-7B architecture with random weights,
see full_size.py). The
JSON is rewritten atomically after every stage, so a crash or timeout leaves the stages
that finished.

Run: `python -m dymu.matrix.runner --cell latest --out reports/cells/latest.json`
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .digest import code_digest

SCHEMA = 1
PACKAGES = ("torch", "transformers", "tokenizers", "huggingface-hub", "accelerate", "numpy", "safetensors",
            "pillow", "llava-torch", "sentencepiece", "protobuf")  # fmt: skip


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _error(err: BaseException) -> dict[str, str]:
    lines = traceback.format_exception(type(err), err, err.__traceback__)
    return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}",
            "traceback_tail": "".join(lines)[-1500:]}  # fmt: skip


def stage_fixes() -> dict[str, Any]:
    from ..compat import all_fixes, check

    results = [check(fix, negative=True) for fix in all_fixes().values()]
    bad = [r["fix"] for r in results if r["verify"] == "failed"
           or r.get("negative") in ("did not fail", "failed differently")]  # fmt: skip
    return {"status": "fail" if bad else "pass", "failing": bad, "fixes": results}


def stage_inference_and_golden(golden_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    from ..checkpoints import bin_blocked
    from ..errors import DymuError
    from ..versions import installed
    from .golden import CASES, case_family, compare, load_golden, run_case

    golden = load_golden(golden_path)
    tau = torch.tensor(golden["thresholds"])
    atol = golden["tolerance"]["top_logits_atol"]
    inference: dict[str, Any] = {}
    comparison: dict[str, Any] = {}
    for case in CASES:
        if case_family(case) == "legacy" and installed("llava-torch") is None:
            inference[case] = comparison[case] = {"status": "n.a.", "why": "llava-torch not installed"}
            continue
        start = time.perf_counter()
        try:
            got = run_case(case, tau)
        except DymuError as err:
            known = case.endswith("-bin") and bin_blocked() and "only .bin weights" in str(err)
            entry = {"status": "known" if known else "fail", "error": str(err)[:300]}
            if known:
                entry["why"] = (
                    "transformers >= 4.52 refuses .bin on torch < 2.6; dymu names the fix (dymu convert)"
                )
            inference[case] = comparison[case] = entry
            continue
        except Exception as err:
            inference[case] = comparison[case] = {"status": "fail", **_error(err)}
            continue
        inference[case] = {"status": "pass", "seconds": round(time.perf_counter() - start, 2),
                           "visual_tokens": got["visual_tokens"], "greedy_ids": got["greedy_ids"]}  # fmt: skip
        problems = compare(got, golden["cases"][case], atol)
        worst = max(abs(a - b) for ra, rb in zip(got["top_logits"], golden["cases"][case]["top_logits"], strict=True)
                    for a, b in zip(ra, rb, strict=True))  # fmt: skip
        comparison[case] = {"status": "fail" if problems else "pass", "problems": problems,
                            "max_top_logit_diff": worst, "atol": atol}  # fmt: skip
    return _summarize(inference), _summarize(comparison)


def _summarize(cases: dict[str, Any]) -> dict[str, Any]:
    statuses = {c["status"] for c in cases.values()}
    return {"status": "fail" if "fail" in statuses else "pass", "cases": cases}


def stage_bench(repeats: int = 5) -> dict[str, Any]:
    """Stock vs DyMU greedy generation on the tiny llava-hf model, same process (CPU or GPU)."""
    import torch

    from .. import format_prompt, load
    from ..bench.timing import time_side_by_side
    from ..generation import generate_prepared
    from ..hf_llava import stock_inputs
    from ..sample_images import make_sample_images
    from ..tiny import ensure_tiny_checkpoints
    from .golden import load_golden

    path = ensure_tiny_checkpoints()["llava-hf-tiny-safetensors"]
    model = load(path, thresholds=torch.tensor(load_golden()["thresholds"]))
    prompts = [format_prompt("What is in the picture?")] * 4
    images = make_sample_images(4)
    ids = [model.tokenize(p) for p in prompts]
    stock_in = stock_inputs(model.parts, ids, model.pixel_values(images))

    def stock() -> object:
        with torch.no_grad():
            return model.model.generate(**stock_in, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                        pad_token_id=0)  # fmt: skip

    def dymu() -> object:
        return generate_prepared(model.parts, model.prepare(prompts, images), 8, min_new_tokens=8)

    stats = time_side_by_side({"stock": stock, "dymu": dymu}, torch.device("cpu"), warmup=1, repeats=repeats)
    return {"status": "pass", "what": "tiny llava-hf, batch 4, 8 new tokens, random weights",
            "latency": stats, "ratio_stock_over_dymu": stats["stock"]["mean_ms"] / stats["dymu"]["mean_ms"]}  # fmt: skip


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
    from ..compat import all_fixes

    signatures = [fix.error for fix in all_fixes().values()]
    texts = [t for name in failed for t in _stage_errors(stages[name])]
    matched = {t: next((s for s in signatures if re.search(s, t)), None) for t in texts}
    return {"class": "stage-failure", "signature": texts[0][:300], "known": all(matched.values()),
            "stages": failed}  # fmt: skip


def run(cell: str, out: Path, golden: Path, bench: bool = True, full_size: bool = True) -> dict[str, Any]:
    from ..atomic import write_text_atomic

    result: dict[str, Any] = {
        "schema": SCHEMA, "cell": cell, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "code": code_digest(), "versions": versions(), "status": "running", "stages": {},
        "backend": os.environ.get("DYMU_MATRIX_BACKEND", "local"),
    }  # fmt: skip

    def save() -> None:
        write_text_atomic(out, json.dumps(result, indent=1) + "\n")

    t0 = time.perf_counter()
    save()
    if os.environ.get("DYMU_MATRIX_SELF_KILL") == "1":  # the matrix's failure-isolation check
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        import torch  # the import itself is the stage
        import transformers  # noqa: F401

        import dymu  # noqa: F401

        from ..compat import DISABLE_ENV, all_fixes, disabled

        unknown = sorted(disabled() - set(all_fixes()))
        if unknown:  # a typo would make the broken-cell check pass vacuously
            raise ValueError(f"{DISABLE_ENV} names unknown fixes {unknown}; known: {sorted(all_fixes())}")
        result["disabled_fixes"] = sorted(disabled())
        result["where"] = "gpu" if torch.cuda.is_available() else "cpu"
        result["stages"]["import"] = {"status": "pass"}
    except Exception as err:
        result["stages"]["import"] = {"status": "fail", **_error(err)}
    save()
    if result["stages"]["import"]["status"] == "pass":
        steps = [("fixes", stage_fixes)]
        steps.append(("inference+golden", lambda: stage_inference_and_golden(golden)))
        if bench:
            steps.append(("bench", stage_bench))
        if full_size:
            from .full_size import stage_full_size

            steps.append(("full-size", stage_full_size))
        for name, fn in steps:
            try:
                value = fn()
                if name == "inference+golden":
                    result["stages"]["inference"], result["stages"]["golden"] = value
                else:
                    result["stages"][name] = value
            except Exception as err:
                result["stages"][name] = {"status": "fail", **_error(err)}
            save()
    failed = [n for n, s in result["stages"].items() if s["status"] == "fail"]
    result["status"] = "fail" if failed else "pass"
    result["failed_stages"] = failed
    if failed:
        result["failure"] = failure_summary(result["stages"], failed)
    result["duration_s"] = round(time.perf_counter() - t0, 1)
    save()
    return result


def main(argv: list[str] | None = None) -> int:
    from .golden import GOLDEN_FILE

    parser = argparse.ArgumentParser(prog="python -m dymu.matrix.runner", description=__doc__.splitlines()[0])
    parser.add_argument("--cell", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--golden", type=Path, default=GOLDEN_FILE)
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--no-full-size", action="store_true", help="skip the full-size GPU stage")
    args = parser.parse_args(argv)
    result = run(args.cell, args.out, args.golden, bench=not args.no_bench, full_size=not args.no_full_size)
    print(
        f"cell {args.cell}: {result['status']} ({', '.join(result['failed_stages']) or 'all stages passed'})"
    )
    return 0 if result["status"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
