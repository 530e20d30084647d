"""Kernel-level profile of one static-shape DToMe tower forward (where the GPU time goes).

Run: `python -m dymu.bench.profile_tower --batch-size 8` on a CUDA machine.
"""

from __future__ import annotations

import argparse

import torch

from ..blocks import forward_tokens, layers_to_run, threshold_rule, vision_transformer
from ..calibration import calibrate
from ..errors import run_main
from ..images import preprocess
from ..testing.builders import clip_processor, random_clip
from ..testing.photos import bench_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dymu.bench.profile_tower")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--geometry", default="full")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    dev = torch.device("cuda")
    model = random_clip(args.geometry, dev, torch.bfloat16)
    processor = clip_processor(336)
    tau = calibrate(model, bench_images(64, seed=1), 72, batch_size=32, processor=processor, progress=False)
    pixels = preprocess(bench_images(args.batch_size, seed=2), processor).to(dev, torch.bfloat16)
    vt = vision_transformer(model)
    rule, may_merge = threshold_rule(tau, 24)
    n_run = layers_to_run(24, -2)
    with torch.no_grad():
        for _ in range(3):
            forward_tokens(vt, pixels, rule, may_merge, n_run, static=True)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            forward_tokens(vt, pixels, rule, may_merge, n_run, static=True)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    run_main(main)
