"""Golden outputs: what the reference cell (torch 2.1.2 + transformers 4.37.2) produces for the
tiny model on fixed inputs, and the comparison every other cell must pass.

Silent breakage (a dropped cache, an unforwarded mapping, a wrong tokenizer) changes these
numbers without raising, so each cell compares: integers exactly (prompt ids, per-layer
token counts, mappings, greedy ids), floats (the top-k prefill logits) within the tolerance
stored next to the data.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import transformers

from ..api import format_prompt, load
from ..atomic import write_text_atomic
from ..calibration import calibrate
from ..generation import generate_prepared
from ..testing.sample_images import make_sample_images
from ..testing.tiny import NOBOS, ensure_tiny_checkpoints, nobos_variant
from ..vision_loading import load_vision_tower
from .digest import GOLDEN_FILE

QUESTIONS = ("What is in the picture?", "Describe the colours and shapes, please.", "Is it busy?")
RECORDED = (
    "llava-hf-tiny-safetensors",
    "llava-hf-tiny-bin",
    "llava-v1.5-tiny-safetensors",
    "llava-v1.5-tiny-bin",
)
# variants that must reproduce a recorded case exactly (no entries of their own in the golden file)
SAME_AS = {NOBOS: "llava-v1.5-tiny-safetensors"}  # tokenizer_config.json without add_bos_token
CASES = (*RECORDED, *SAME_AS)
NEW_TOKENS = 8
TOP_K = 5


def case_family(case: str) -> str:
    return "hf" if case.startswith("llava-hf") else "legacy"


def golden_thresholds() -> torch.Tensor:
    """Thresholds calibrated once for the tiny tower; stored in the golden file as an input."""
    tower, processor = load_vision_tower(ensure_tiny_checkpoints()["clip"])
    return calibrate(tower, make_sample_images(16, seed=1), 16, 16, processor, progress=False)


@torch.no_grad()
def run_case(case: str, thresholds: torch.Tensor, vtu: str = "fast") -> dict[str, Any]:
    """The observable outputs of one checkpoint directory on the fixed inputs."""
    model = load(
        nobos_variant() if case == NOBOS else ensure_tiny_checkpoints()[case], thresholds=thresholds, vtu=vtu
    )
    prompts = [format_prompt(q) for q in QUESTIONS]
    images = make_sample_images(len(prompts))
    batch = model.prepare(prompts, images)
    out = generate_prepared(model.parts, batch, NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    first = out.scores[0].float()
    top = first.topk(TOP_K, dim=-1)
    ordered = first.sort(dim=-1, descending=True).values
    return {
        "prompt_ids": [model.tokenize(p) for p in prompts],
        "visual_tokens": batch.visual_tokens,
        "tokens_per_layer": batch.tower.tokens_per_layer.tolist(),
        "mappings": [m.tolist() for m in batch.tower.mapping],
        "greedy_ids": out.sequences[:, batch.virtual_ids.shape[1] :].tolist(),
        "top_ids": top.indices.tolist(),
        "top_logits": top.values.tolist(),
        "top1_gap": (ordered[:, 0] - ordered[:, 1]).tolist(),
    }


INT_FIELDS = ("prompt_ids", "visual_tokens", "tokens_per_layer", "mappings", "greedy_ids", "top_ids")


def compare(got: dict[str, Any], want: dict[str, Any], atol: float) -> list[str]:
    """Differences between a cell's outputs and the golden ones ([] means it matches)."""
    problems = [f"{field} differ" for field in INT_FIELDS if got[field] != want[field]]
    worst = max(
        (abs(a - b) for row_a, row_b in zip(got["top_logits"], want["top_logits"], strict=True)
         for a, b in zip(row_a, row_b, strict=True)),
        default=0.0,
    )  # fmt: skip
    if worst > atol:
        problems.append(f"top_logits off by {worst:.3g} > atol {atol:g}")
    return problems


def expected(golden: dict[str, Any], case: str) -> dict[str, Any]:
    """The golden entry a case is compared with (a variant uses the case it must reproduce)."""
    return golden["cases"][SAME_AS.get(case, case)]


def load_golden(path: Path = GOLDEN_FILE) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    data["thresholds"] = [float(t) for t in data["thresholds"]]  # "inf" is stored as a string
    return data


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def write_golden(path: Path = GOLDEN_FILE, atol: float = 1e-4) -> Path:
    """Regenerate the golden file on this stack (meant for the reference cell); review the diff."""
    tau = golden_thresholds()
    cases = {case: run_case(case, tau) for case in RECORDED}
    data = {
        "about": "golden outputs of the tiny model, produced by the reference cell; see dymu/matrix/golden.py",
        "stack": {"torch": torch.__version__, "transformers": transformers.__version__},
        "tolerance": {
            "integers": "exact",
            "top_logits_atol": atol,
            "why": "float32; the largest top-5 logit difference seen against this file across the five CPU "
            "test cells (torch 2.1-2.15, transformers 4.37-5.24) was 3.8e-6 at logit scale ~4; the smallest "
            "top-1/top-2 gap (top1_gap) is 0.21, so greedy ids cannot flip within the tolerance",
        },
        "thresholds": [float(t) if math.isfinite(t) else str(float(t)) for t in tau.tolist()],  # "inf"
        "cases": cases,
    }
    return write_text_atomic(path, json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    print(write_golden())
