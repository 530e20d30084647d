"""Vision-tower benchmark: stock HF CLIP vs the DToMe tower, same process, same pixels.

Run: `python -m dymu.bench.tower --geometry small` (CPU) or `--geometry full --device cuda`
(CLIP-L/336 at full width). Weights are RANDOM (seeded); reports say so. Thresholds are
calibrated in the same run on a calibration image set disjoint from the timed batch.
`--varied` gives every call new images, as a real data set does (new merge patterns, so new
padded shapes for the paths that trim); without it every call repeats one batch. `--data-file` times
the first image of each of its samples (in order, cycling) instead of the generated photos.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import transformers

from ..calibration import calibrate
from ..errors import run_main
from ..images import load_image, preprocess
from ..options import Options
from ..testing.builders import CLIP_GEOMETRIES, clip_processor, random_clip
from ..testing.photos import bench_images
from ..tower import encode_images
from . import bench_dtype, bench_parser, emit
from .data import load_data_file, resolve_image
from .run import data_path
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
    varied: bool = False,
    data_file: str | None = None,
) -> dict[str, Any]:
    """Calibrate, then time stock / DToMe(no merges) / DToMe(calibrated, each path) per batch size
    (on `data_file`'s images if given; calibration always uses the generated photos)."""
    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    calls = warmup + repeats if varied else 1
    own = _data_images(data_file, max(batch_sizes) * calls) if data_file else None  # bad files fail first
    model = random_clip(geometry, dev, torch_dtype)
    processor = clip_processor(336)
    calib = bench_images(calib_images, seed=1)
    thresholds = calibrate(
        model, calib, target_tokens=target_tokens, batch_size=32, processor=processor, progress=False
    )
    rows = []
    for bsz in batch_sizes:
        images = own[: bsz * calls] if own else bench_images(bsz * calls, seed=2)
        batches = [
            preprocess(images[i * bsz : (i + 1) * bsz], processor).to(dev, torch_dtype) for i in range(calls)
        ]
        tokens = torch.cat([encode_images(model, p, thresholds).num_tokens for p in batches]).float()

        def stock(pixels: torch.Tensor) -> object:
            with torch.no_grad():
                return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]

        paths = {
            "stock": stock,
            "dtome_no_merge": lambda p: encode_images(model, p, None),
            "dtome": lambda p: encode_images(model, p, thresholds),  # the defaults
        }
        if dev.type == "cuda":  # the default above is one graph of the whole tower; the other paths
            paths["dtome_eager"] = lambda p: encode_images(
                model, p, thresholds, options=Options(cuda_graphs=False)
            )
            paths["dtome_segments"] = lambda p: encode_images(
                model, p, thresholds, options=Options(graph_segment=4)
            )
            paths["dtome_uncompiled"] = lambda p: encode_images(
                model, p, thresholds, options=Options(compile_tower=False)
            )
        candidates = {name: _cycling(fn, batches) for name, fn in paths.items()}
        stats = time_side_by_side(candidates, dev, warmup=warmup, repeats=repeats)
        memory = {name: peak_memory_mb(fn, dev) for name, fn in candidates.items()}
        rows.append(
            {
                "batch_size": bsz,
                "varied": varied,
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
        "images": str(data_file) if data_file else "generated photos (dymu.testing.photos, seed 2)",
        "thresholds": [float(t) for t in thresholds],
        "rows": rows,
    }


def _data_images(data_file: str, count: int) -> list:
    """The first image of each sample of a data file, in order, repeated until there are `count`."""
    data = load_data_file(data_path(data_file))
    first = [load_image(resolve_image(sample.image_paths[0], data.path)) for sample in data.samples]
    return list(itertools.islice(itertools.cycle(first), count))


def _cycling(fn: Callable[[torch.Tensor], object], batches: list[torch.Tensor]) -> Callable[[], object]:
    """A zero-argument call that feeds `fn` the next batch each time (so each candidate sees the
    same sequence: warm-up batches first, then timed ones it has never seen when `--varied`)."""
    calls = itertools.count()
    return lambda: fn(batches[next(calls) % len(batches)])


def format_table(report: dict[str, Any]) -> str:
    """A terminal table of the report's rows."""
    lines = [
        f"vision tower bench: {report['geometry']} geometry, {report['dtype']}, {report['device']}, "
        f"torch {report['torch']}, transformers {report['transformers']} ({report['weights']})",
        "no-merge = our tower with no merges; dtome = the defaults (one graph of compiled blocks on CUDA);"
        " uncompiled / eager / segments = the other CUDA paths"
        + ("; new images every call" if report["rows"] and report["rows"][0]["varied"] else ""),
        f"{'batch':>5} {'tokens':>12} {'stock ms':>10} {'no-merge ms':>12} {'dtome ms':>10}"
        f" {'uncompiled ms':>14} {'eager ms':>10} {'segments ms':>12} {'dtome/stock':>12}",
    ]
    for row in report["rows"]:
        lat = row["latency"]
        lines.append(
            f"{row['batch_size']:>5} {row['tokens']['mean']:>7.1f}±{row['tokens']['std']:<4.0f} "
            f"{lat['stock']['mean_ms']:>10.2f} {lat['dtome_no_merge']['mean_ms']:>12.2f} "
            f"{lat['dtome']['mean_ms']:>10.2f} {_ms(lat, 'dtome_uncompiled'):>14} {_ms(lat, 'dtome_eager'):>10}"
            f" {_ms(lat, 'dtome_segments'):>12}"
            f" {row['ratio_dtome_vs_stock']:>11.2f}x"
        )
    return "\n".join(lines)


def _ms(latency: dict[str, Any], name: str) -> str:
    return f"{latency[name]['mean_ms']:.2f}" if name in latency else "-"


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("python -m dymu.bench.tower", __doc__.splitlines()[0], repeats=10)
    parser.add_argument("--geometry", choices=sorted(CLIP_GEOMETRIES), default="small")
    parser.add_argument("--calib-images", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--varied", action="store_true", help="new images every call (as a data set gives)")
    parser.add_argument("--data-file", default=None, help="time these images (a data file, or `sample`)")
    args = parser.parse_args(argv)
    report = run(args.geometry, args.device, bench_dtype(args), tuple(args.batch_sizes), args.target_tokens,
                 args.calib_images, args.repeats, args.warmup, args.varied, args.data_file)  # fmt: skip
    return emit(report, format_table(report), args.out)


if __name__ == "__main__":
    run_main(main)
