"""Golden outputs: what the reference cell (torch 2.1.2 + transformers 4.37.2) produces for the
tiny model on fixed inputs, and the comparison every other cell must pass.

Silent breakage (a dropped cache, an unforwarded mapping, a wrong tokenizer) changes these
numbers without raising, so each cell compares: integers exactly (prompt ids, per-layer
token counts, mappings, greedy ids), floats (the top-k prefill logits) within the tolerance
stored next to the data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import transformers

from ..api import format_prompt, load
from ..atomic import write_text_atomic
from ..generation import generate_prepared
from ..testing import shapes
from ..testing.sample_images import make_sample_images
from ..testing.tiny import NOBOS, TinySpec, ensure_tiny_checkpoints, nobos_variant
from ..testing.tiny_thresholds import tiny_thresholds
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
TASK_IMAGES = 12  # shapes.test_set: every question kind about 12 unseen pictures (48 questions)
TASK_NEW_TOKENS = 16  # the longest answer, "three yellow triangles", is 12 tokens + </s>
# The probes (exact ids, mappings and logits across stacks) run on the seeded random-weight fixture,
# whose similarities are well separated; the trained model's flat backgrounds give near-ties that
# float noise may break either way (same outputs, other mapping). The task runs on the trained one.
PROBE_SPEC = TinySpec(weights="random")


def case_family(case: str) -> str:
    return "hf" if case.startswith("llava-hf") else "legacy"


def golden_thresholds() -> torch.Tensor:
    """Thresholds calibrated once for the probes' (random-weight) tower; stored in the golden file."""
    return tiny_thresholds(PROBE_SPEC)


def task_thresholds() -> torch.Tensor:
    """Thresholds for the trained tower (what `dymu infer` calibrates by default); stored too."""
    return tiny_thresholds()


def _case_path(case: str, spec: TinySpec) -> Path:
    paths = ensure_tiny_checkpoints(spec=spec)
    return nobos_variant(paths) if case == NOBOS else paths[case]


@torch.no_grad()
def task_scores(case: str, thresholds: torch.Tensor) -> dict[str, Any]:
    """The trained tiny model on the shapes test set, stock and DyMU: accuracy overall and per
    question kind, the mean visual tokens, and the greedy answer ids (exact in the golden file)."""
    items = shapes.test_set(TASK_IMAGES)
    prompts = [format_prompt(it.question) for it in items]
    images = [it.image for it in items]
    out: dict[str, Any] = {}
    for mode, tau in (("stock", None), ("dymu", thresholds)):
        model = load(_case_path(case, TinySpec()), thresholds=tau)
        answers = model.generate(prompts, images, max_new_tokens=TASK_NEW_TOKENS)
        texts = [a.text for a in answers]
        out[mode] = {
            "accuracy": round(shapes.accuracy(texts, items), 6),
            "by_kind": {k: round(v, 6) for k, v in shapes.accuracy_by_kind(texts, items).items()},
            "visual_tokens_mean": round(sum(a.visual_tokens for a in answers) / len(answers), 4),
            "answer_ids": [a.token_ids for a in answers],
        }
    return out


@torch.no_grad()
def run_case(case: str, thresholds: torch.Tensor, vtu: str = "fast",
             task_tau: torch.Tensor | None = None) -> dict[str, Any]:  # fmt: skip
    """The observable outputs of one checkpoint directory on the fixed inputs: the probes on the
    random-weight fixture, and (with `task_tau`) the trained model's shapes-task scores."""
    model = load(_case_path(case, PROBE_SPEC), thresholds=thresholds, vtu=vtu)
    prompts = [format_prompt(q) for q in QUESTIONS]
    images = make_sample_images(len(prompts))
    batch = model.prepare(prompts, images)
    out = generate_prepared(model.parts, batch, NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    first = out.scores[0].float()
    top = first.topk(TOP_K, dim=-1)
    ordered = first.sort(dim=-1, descending=True).values
    result = {
        "prompt_ids": [model.tokenize(p) for p in prompts],
        "visual_tokens": batch.visual_tokens,
        "tokens_per_layer": batch.tower.tokens_per_layer.tolist(),
        "mappings": [m.tolist() for m in batch.tower.mapping],
        "greedy_ids": out.sequences[:, batch.virtual_ids.shape[1] :].tolist(),
        "top_ids": top.indices.tolist(),
        "top_logits": top.values.tolist(),
        "top1_gap": (ordered[:, 0] - ordered[:, 1]).tolist(),
    }
    if task_tau is not None:
        result["task"] = task_scores(case, task_tau)
    return result


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
    for mode in ("stock", "dymu") if "task" in got else ():
        have, need = got["task"][mode], want["task"][mode]
        if have["accuracy"] != need["accuracy"]:
            problems.append(f"task accuracy ({mode}) {have['accuracy']:.3f}, golden {need['accuracy']:.3f}")
        if have["answer_ids"] != need["answer_ids"]:
            problems.append(f"task answers ({mode}) differ")
    return problems


def expected(golden: dict[str, Any], case: str) -> dict[str, Any]:
    """The golden entry a case is compared with (a variant uses the case it must reproduce)."""
    return golden["cases"][SAME_AS.get(case, case)]


def load_golden(path: Path = GOLDEN_FILE) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("thresholds", "task_thresholds"):
        if key in data:
            data[key] = [float(t) for t in data[key]]  # "inf" is stored as a string
    return data


def _stored(tau: torch.Tensor) -> list[float | str]:
    return [float(t) if math.isfinite(t) else str(float(t)) for t in tau.tolist()]  # "inf" as a string


def write_golden(path: Path = GOLDEN_FILE, atol: float = 1e-4) -> Path:
    """Regenerate the golden file on this stack (meant for the reference cell); review the diff."""
    tau, task_tau = golden_thresholds(), task_thresholds()
    cases = {case: run_case(case, tau, task_tau=task_tau) for case in RECORDED}
    data = {
        "about": "golden outputs of the tiny model, produced by the reference cell; see dymu/matrix/golden.py",
        "stack": {"torch": torch.__version__, "transformers": transformers.__version__},
        "tolerance": {
            "integers": "exact",
            "top_logits_atol": atol,
            "why": "float32; the largest top-5 logit difference seen across the five CPU test cells (torch "
            "2.1-2.15, transformers 4.37-5.24) was 3.8e-6 (random weights); the smallest top-1/top-2 gap "
            f"(top1_gap) in this file is {min(min(c['top1_gap']) for c in cases.values()):.2f}, so greedy ids "
            "cannot flip within the tolerance",
        },
        "thresholds": _stored(tau),
        "task_thresholds": _stored(task_tau),
        "cases": cases,
    }
    return write_text_atomic(path, json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    print(write_golden())
