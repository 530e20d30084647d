"""The full-size stage's float32 identity gate on the GPU machine, with today's default paths: DyMU
with merging off must reproduce stock LLaVA (KV cache and logits), at batch 4 and batch 1 (the
graphed prefill). Random full-size weights; writes identity_fp32.json under $OUT (or here).

    PYTHONPATH=. python scripts/gpu_identity.py
"""

from __future__ import annotations

import json
import os

import torch

from dymu.bench.llava import prompt_ids
from dymu.families import FAMILIES
from dymu.images import preprocess
from dymu.matrix.full_size import TEXT_TOKENS, identity_check, stock_run
from dymu.testing.builders import clip_processor, random_llava
from dymu.testing.photos import bench_images


def main() -> int:
    device = torch.device("cuda")
    ids = prompt_ids(4, TEXT_TOKENS, seed=5)
    pixels = preprocess(bench_images(4, seed=3), clip_processor(336)).to(device)
    model = random_llava("full", device, torch.float32)
    parts = FAMILIES["hf"].parts(model)
    stock = stock_run(model, parts, ids, pixels)
    results = {
        "identity": identity_check(model, parts, ids, pixels, stock=stock),
        "identity-batch-1": identity_check(model, parts, ids[:1], pixels[:1]),
    }
    for name, result in results.items():
        print(name, result["status"], result["problems"], "cache relative error", result["cache_relative_error"],
              "logits relative error", result["logits"]["relative_error"], flush=True)  # fmt: skip
    with open(os.path.join(os.environ.get("OUT", "."), "identity_fp32.json"), "w") as out:
        json.dump(results, out, indent=1, default=str)
    return 0 if all(r["status"] == "pass" for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
