"""Vision-tower benchmark: stock HF CLIP vs the DToMe tower, same process, same pixels.

Run: `python -m dymu.bench.tower --geometry small` (CPU) or `--geometry full --device cuda`
(CLIP-L/336 at full width). Weights are RANDOM (seeded); reports say so. Thresholds are
calibrated in the same run on a calibration image set disjoint from the timed batch.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

import torch

from ..calibrate import calibrate
from ..tower import encode_images
from . import bench_dtype, bench_parser, emit
from .images import bench_images, clip_processor
from .timing import peak_memory_mb, time_side_by_side

GEOMETRIES = {
    # real ViT-L/14-336 depth and token count; width shrunk so a 2-core CPU can time it
    "small": {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4},
    # CLIP ViT-L/14-336 as LLaVA-1.5 uses it
    "full": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16},
}


def build_clip(geometry: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A random-weight CLIP vision tower with 336-px / patch-14 / 24-layer geometry, built on `device`."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        image_size=336, patch_size=14, num_hidden_layers=24, hidden_act="quick_gelu", **GEOMETRIES[geometry]
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = CLIPVisionModel(cfg)
    return model.to(dtype).eval()


def device_name(device: torch.device) -> str:
    """The card (e.g. 'NVIDIA H100 80GB HBM3') or the CPU's description."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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
    model = build_clip(geometry, dev, torch_dtype)
    processor = clip_processor(336)
    calib = bench_images(calib_images, seed=1)
    thresholds = calibrate(
        model, calib, target_tokens=target_tokens, batch_size=32, processor=processor, progress=False
    )
    timed_images = bench_images(max(batch_sizes), seed=2)
    from ..images import preprocess

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
        if dev.type == "cuda":  # the default above is graphed; also time the eager shrinking path
            candidates["dtome_eager"] = lambda pixels=pixels: encode_images(
                model, pixels, thresholds, cuda_graph=False
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
    import transformers

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
        "no-merge = our tower with no merges; on CUDA both ours run as CUDA graphs, eager = shrinking path",
        f"{'batch':>5} {'tokens':>12} {'stock ms':>10} {'no-merge ms':>12} {'dtome ms':>10} {'eager ms':>10}"
        f" {'dtome/stock':>12}",
    ]
    for row in report["rows"]:
        lat = row["latency"]
        lines.append(
            f"{row['batch_size']:>5} {row['tokens']['mean']:>7.1f}±{row['tokens']['std']:<4.0f} "
            f"{lat['stock']['mean_ms']:>10.2f} {lat['dtome_no_merge']['mean_ms']:>12.2f} "
            f"{lat['dtome']['mean_ms']:>10.2f} {lat.get('dtome_eager', {}).get('mean_ms', float('nan')):>10.2f}"
            f" {row['ratio_dtome_vs_stock']:>11.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("python -m dymu.bench.tower", __doc__.splitlines()[0], repeats=10)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="small")
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    report = run(args.geometry, args.device, bench_dtype(args), tuple(args.batch_sizes), args.target_tokens,
                 args.calib_images, args.repeats, args.warmup)  # fmt: skip
    return emit(report, format_table(report), args.out)


if __name__ == "__main__":
    sys.exit(main())
