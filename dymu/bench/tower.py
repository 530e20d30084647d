"""Vision-tower benchmark: stock HF CLIP vs the DToMe tower, same process, same pixels.

Run: `python -m dymu.bench.tower --geometry small` (CPU) or `--geometry full --device cuda`
(CLIP-L/336 at full width). Weights are RANDOM (seeded); reports say so. Thresholds are
calibrated in the same run on a calibration image set disjoint from the timed batch.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from ..calibration import calibrate
from ..errors import run_main
from ..images import preprocess
from ..options import Options
from ..testing.builders import CLIP_GEOMETRIES, clip_processor, random_clip
from ..testing.photos import bench_images
from ..tower import encode_images
from . import bench_dtype, bench_parser, emit
from .timing import device_name, peak_memory_mb, time_side_by_side


def run(
    geometry: str = "small",
    device: str = "cpu",
    dtype: str = "float32",
    batch_sizes: tuple[int, ...] = (1, 8),
    target_tokens: int = 72,
    calib_images: int = 64,
    repeats: int = 10,
    warmup: int = 3,
) -> dict[str, Any]:
    """Calibrate, then time stock / DToMe(no merges) / DToMe(calibrated) at each batch size."""
    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    model = random_clip(geometry, dev, torch_dtype)
    processor = clip_processor(336)
    calib = bench_images(calib_images, seed=1)
    thresholds = calibrate(
        model, calib, target_tokens=target_tokens, batch_size=32, processor=processor, progress=False
    )
    timed_images = bench_images(max(batch_sizes), seed=2)
    all_pixels = preprocess(timed_images, processor).to(dev, torch_dtype)

    rows = []
    for bsz in batch_sizes:
        pixels = all_pixels[:bsz]
        out = encode_images(model, pixels, thresholds)
        tokens = out.num_tokens.float()

        def stock(pixels: torch.Tensor = pixels) -> object:
            with torch.no_grad():
                return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]

        candidates = {
            "stock": stock,
            "dtome_no_merge": lambda pixels=pixels: encode_images(model, pixels, None),
            "dtome": lambda pixels=pixels: encode_images(model, pixels, thresholds),
        }
        if dev.type == "cuda":  # the default above is eager; also time the CUDA-graph segments
            candidates["dtome_graphs"] = lambda pixels=pixels: encode_images(
                model, pixels, thresholds, options=Options(cuda_graphs=True)
            )
        stats = time_side_by_side(candidates, dev, warmup=warmup, repeats=repeats)
        memory = {name: peak_memory_mb(fn, dev) for name, fn in candidates.items()}
        rows.append(
            {
                "batch_size": bsz,
                "tokens": {
                    "mean": float(tokens.mean()),
                    "std": float(tokens.std()) if bsz > 1 else 0.0,
                    "min": int(tokens.min()),
                    "max": int(tokens.max()),
                },
                "latency": stats,
                "peak_memory_mb": memory,
                "ratio_dtome_vs_stock": stats["dtome"]["mean_ms"] / stats["stock"]["mean_ms"],
                "ratio_no_merge_vs_stock": stats["dtome_no_merge"]["mean_ms"] / stats["stock"]["mean_ms"],
                "ratio_dtome_vs_no_merge": stats["dtome"]["mean_ms"] / stats["dtome_no_merge"]["mean_ms"],
            }
        )
    return {
        "benchmark": "vision_tower",
        "weights": "random (seeded); timings only, no accuracy meaning",
        "geometry": geometry,
        "device": device_name(dev),
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "target_tokens": target_tokens,
        "thresholds": [float(t) for t in thresholds],
        "rows": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    """A terminal table of the report's rows."""
    lines = [
        f"vision tower bench: {report['geometry']} geometry, {report['dtype']}, {report['device']}, "
        f"torch {report['torch']}, transformers {report['transformers']} ({report['weights']})",
        "no-merge = our tower with no merges (eager); graphs = the CUDA-graph segments (CUDA only)",
        f"{'batch':>5} {'tokens':>12} {'stock ms':>10} {'no-merge ms':>12} {'dtome ms':>10} {'graphs ms':>10}"
        f" {'dtome/stock':>12}",
    ]
    for row in report["rows"]:
        lat = row["latency"]
        lines.append(
            f"{row['batch_size']:>5} {row['tokens']['mean']:>7.1f}±{row['tokens']['std']:<4.0f} "
            f"{lat['stock']['mean_ms']:>10.2f} {lat['dtome_no_merge']['mean_ms']:>12.2f} "
            f"{lat['dtome']['mean_ms']:>10.2f} {lat.get('dtome_graphs', {}).get('mean_ms', float('nan')):>10.2f}"
            f" {row['ratio_dtome_vs_stock']:>11.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("python -m dymu.bench.tower", __doc__.splitlines()[0], repeats=10)
    parser.add_argument("--geometry", choices=sorted(CLIP_GEOMETRIES), default="small")
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    report = run(args.geometry, args.device, bench_dtype(args), tuple(args.batch_sizes), args.target_tokens,
                 args.calib_images, args.repeats, args.warmup)  # fmt: skip
    return emit(report, format_table(report), args.out)


if __name__ == "__main__":
    run_main(main)
