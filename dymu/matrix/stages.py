"""The heavy stages of a cell runner (imported by `runner.py` as its import stage, so a stack
that cannot import torch, transformers or dymu still leaves a result saying so)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..api import format_prompt, load
from ..bench.timing import time_side_by_side
from ..compat.checks import check_all
from ..compat.shims import bin_blocked
from ..errors import DymuError
from ..families.hf import stock_inputs
from ..generation import generate_prepared
from ..testing.sample_images import make_sample_images
from ..testing.tiny import ensure_tiny_checkpoints
from ..versions import installed
from .full_size import stage_full_size
from .golden import CASES, case_family, compare, load_golden, run_case
from .runner_errors import error_entry

__all__ = ["stage_bench", "stage_fixes", "stage_full_size", "stage_inference_and_golden"]


def stage_fixes() -> dict[str, Any]:

    results = check_all(negative=True)
    bad = [r["fix"] for r in results if r["verify"] == "failed"
           or r.get("negative") in ("did not fail", "failed differently")]  # fmt: skip
    return {"status": "fail" if bad else "pass", "failing": bad, "fixes": results}


def stage_inference_and_golden(golden_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:

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
            inference[case] = comparison[case] = {"status": "fail", **error_entry(err)}
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
