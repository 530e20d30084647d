"""The heavy stages of a cell runner (imported by `runner.py` as its import stage, so a stack
that cannot import torch, transformers or dymu still leaves a result saying so)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..bench.data import SAMPLE_DATA, load_data_file
from ..bench.report import SCHEMA_FILE
from ..bench.report import build as build_report
from ..bench.run import BenchConfig
from ..bench.run import run as run_bench
from ..compat.checks import check_all
from ..compat.shims import bin_blocked
from ..errors import DymuError
from ..versions import installed
from .full_size import stage_full_size
from .golden import CASES, case_family, compare, expected, load_golden, run_case
from .runner_errors import error_entry

__all__ = ["stage_bench", "stage_fixes", "stage_full_size", "stage_inference_and_golden"]


def stage_fixes() -> dict[str, Any]:

    results = check_all(negative=True)
    bad = [r["fix"] for r in results if r["verify"] == "failed"
           or r.get("negative") in ("did not fail", "failed differently")]  # fmt: skip
    return {"status": "fail" if bad else "pass", "failing": bad, "fixes": results}


def stage_inference_and_golden(golden_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:

    golden = load_golden(golden_path)
    tau, task_tau = torch.tensor(golden["thresholds"]), torch.tensor(golden["task_thresholds"])
    atol = golden["tolerance"]["top_logits_atol"]
    inference: dict[str, Any] = {}
    comparison: dict[str, Any] = {}
    for case in CASES:
        if case_family(case) == "legacy" and installed("llava-torch") is None:
            inference[case] = comparison[case] = {"status": "n.a.", "why": "llava-torch not installed"}
            continue
        start = time.perf_counter()
        try:
            got = run_case(case, tau, task_tau=task_tau)
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
            inference[case] = comparison[case] = {"status": "fail", **error_entry(err)}
            continue
        inference[case] = {"status": "pass", "seconds": round(time.perf_counter() - start, 2),
                           "visual_tokens": got["visual_tokens"], "greedy_ids": got["greedy_ids"],
                           "task_accuracy": task_summary(got["task"])}  # fmt: skip
        want = expected(golden, case)
        problems = compare(got, want, atol)
        worst = max(abs(a - b) for ra, rb in zip(got["top_logits"], want["top_logits"], strict=True)
                    for a, b in zip(ra, rb, strict=True))  # fmt: skip
        comparison[case] = {"status": "fail" if problems else "pass", "problems": problems,
                            "max_top_logit_diff": worst, "atol": atol}  # fmt: skip
    return _summarize(inference), _summarize(comparison)


def task_summary(task: dict[str, Any]) -> dict[str, Any]:
    """The shapes-task numbers a cell reports: accuracy stock and DyMU, and DyMU's visual tokens."""
    return {"stock": task["stock"]["accuracy"], "dymu": task["dymu"]["accuracy"],
            "dymu_visual_tokens": task["dymu"]["visual_tokens_mean"],
            "stock_visual_tokens": task["stock"]["visual_tokens_mean"]}  # fmt: skip


def _summarize(cases: dict[str, Any]) -> dict[str, Any]:
    statuses = {c["status"] for c in cases.values()}
    return {"status": "fail" if "fail" in statuses else "pass", "cases": cases}


def stage_bench(model_path: str = "tiny", device: str = "cpu", dtype: str = "float32", limit: int = 6,
                max_new_tokens: int = 8, batch_size: int = 1) -> dict[str, Any]:  # fmt: skip
    """`dymu bench` itself, stock and DyMU side by side on the packaged sample data; the report must
    validate against the schema (the GPU stage runs it on the full-size random model)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = BenchConfig(model_path=model_path, data_file=str(SAMPLE_DATA), max_new_tokens=max_new_tokens,
                          report_file=str(Path(tmp) / "report.json"), limit=limit, device=device, dtype=dtype,
                          batch_size=batch_size, ignore_eos=True, progress=False)  # fmt: skip
        info, rows, _ = run_bench(cfg, ["dymu", "bench", "(matrix cell)"])
        report = build_report(info, rows, load_data_file(SAMPLE_DATA), False)
    try:
        import jsonschema  # noqa: PLC0415 - optional dependency (the test extra)
    except ImportError:
        schema = "not checked: jsonschema is not installed"
    else:
        jsonschema.validate(report, json.loads(SCHEMA_FILE.read_text()))
        schema = "valid"
    ratios = report["comparison"]["dymu"]["ratios"]
    failed = [r for m in report["modes"].values() for r in m["samples"] if r["failed"]]
    return {
        "status": "fail" if failed else "pass", "what": f"dymu bench: {model_path}, packaged sample data, "
        f"batch {batch_size}, {max_new_tokens} new tokens",
        "summary": {name: {k: m["summary"][k] for k in ("e2e_p50", "ttft_p50", "tbt_p50", "avg_input_len")}
                    | {"visual_tokens": m["visual_tokens"].get("mean")} for name, m in report["modes"].items()},
        "stages_ms": {name: {k: v["mean"] for k, v in m["stages"].items()} for name, m in report["modes"].items()},
        "ratios": {k: (v or {}).get("ratio") for k, v in ratios.items()},
        "ratio_stock_over_dymu": (ratios["e2e"] or {}).get("ratio"), "failed_samples": len(failed), "schema": schema,
    }  # fmt: skip
