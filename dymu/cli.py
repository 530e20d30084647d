"""`dymu` command line: calibrate, doctor, bench. Errors from bad input print one line, exit 2."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import platform
import sys
from pathlib import Path

import torch

from .api import CONV_SYSTEMS, format_prompt, load
from .bench import command as bench_command
from .bench import importers
from .blocks import layers_to_run
from .calibration import calibrate, default_target_tokens, merge_schedule
from .checkpoints import convert_to_safetensors
from .compat.checks import check_all
from .devices import device_from, dtype_from
from .errors import DymuError
from .families import read_config
from .images import list_images, load_image, preprocess
from .jsonsafe import dumps as strict_json
from .matrix import report
from .options import Options
from .quiet import quiet_libraries
from .testing import shapes
from .testing.sample_images import make_sample_images
from .testing.tiny import ensure_tiny_checkpoints
from .testing.tiny_thresholds import tiny_thresholds
from .thresholds import load_thresholds, save_thresholds
from .tower import encode_images
from .versions import installed
from .vision_loading import load_vision_tower

EXIT_USAGE = 2
# doctor --negative, in words: the unfixed path failing as documented is the control doing its job
NEGATIVE_WORDS = {
    "failed as documented": "negative control reproduced the documented failure",
    "failed differently": "negative control FAILED DIFFERENTLY from the documented error",
    "did not fail": "negative control did NOT reproduce the documented failure",
}


def _device(name: str) -> str:
    """The `--device` string, once it names a device this machine has."""
    device_from(name)
    return name


def _fingerprint(items: list) -> str:
    """sha256 over the calibration inputs (file bytes, or image pixels), so a thresholds file
    records exactly which data made it."""
    digest = hashlib.sha256()
    for item in items:
        if isinstance(item, Path):
            digest.update(item.name.encode())
            digest.update(item.read_bytes())
        else:
            digest.update(item.tobytes())
    return digest.hexdigest()


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Calibrate per-layer thresholds on an image folder (default: the tiny model and sample images)."""
    if args.batch_size < 1:
        raise DymuError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.out.is_dir():
        raise DymuError(f"--out {args.out}: is a directory; name the thresholds file to write")
    if not args.out.parent.is_dir():
        raise DymuError(f"--out {args.out}: folder {args.out.parent} does not exist; create it first")

    if args.model is None:
        model_path = ensure_tiny_checkpoints()["clip"]
        images: list = list_images(args.images) if args.images else make_sample_images(32, seed=0)
        print(f"using the embedded tiny LLaVA-1.5 CLIP tower ({model_path}); for testing only")
    else:
        model_path = Path(args.model)
        if args.images is None:
            raise DymuError("--images DIR is required with --model (a folder of calibration images)")

    tower, processor = load_vision_tower(
        model_path, dtype=dtype_from(args.dtype), device=_device(args.device)
    )
    num_patches = (tower.config.image_size // tower.config.patch_size) ** 2
    target = args.target_tokens
    if target is None:
        target = default_target_tokens(num_patches)
        if not args.json:
            print(f"target: {target} tokens per image (default: {num_patches} patches / 8; --target-tokens)")
    if args.model is not None:
        images = list_images(args.images)
    thresholds = calibrate(
        tower,
        images,
        target_tokens=target,
        batch_size=args.batch_size,
        processor=processor,
        feature_layer=args.feature_layer,
        progress=not args.no_progress,
    )
    tokens = []
    for start in range(0, len(images), args.batch_size):
        pixels = preprocess(images[start : start + args.batch_size], processor).to(
            args.device, dtype_from(args.dtype)
        )
        tokens.append(encode_images(tower, pixels, thresholds, args.feature_layer).num_tokens.cpu())
    counts = torch.cat(tokens).float()

    n_layers = len(thresholds)
    n_run = layers_to_run(n_layers, args.feature_layer)
    save_thresholds(
        args.out,
        thresholds,
        source_model=str(model_path),
        target_tokens=target,
        per_layer_r=merge_schedule(num_patches, target, n_run),
        feature_layer=args.feature_layer,
        num_calibration_images=len(images),
        dataset_fingerprint=_fingerprint(images),
        batch_size=args.batch_size,
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    summary = {
        "thresholds": [round(float(t), 5) for t in thresholds],
        "target_tokens": target,
        "calibration_set_tokens": {
            "mean": float(counts.mean()),
            "min": int(counts.min()),
            "max": int(counts.max()),
        },
        "images": len(images),
        "out": str(args.out),
    }
    if args.json:
        print(strict_json(summary))
    else:
        print("per-layer thresholds:", " ".join(f"{t:.4f}" for t in summary["thresholds"]))
        for line in explain_inf(summary["thresholds"], n_run):
            print(line)
        c = summary["calibration_set_tokens"]
        print(
            f"tokens on the calibration set: mean {c['mean']:.1f} (min {c['min']}, max {c['max']}); target {target}"
        )
        print(f"wrote {args.out}")
    return 0


def explain_inf(thresholds: list[float], n_run: int) -> list[str]:
    """Say why a threshold is `inf`: such a layer never merges (a similarity never exceeds it),
    either because LLaVA stops before it or because its schedule asks for no merges."""
    past = [i for i, t in enumerate(thresholds) if t == float("inf") and i >= n_run]
    idle = [i for i, t in enumerate(thresholds) if t == float("inf") and i < n_run]
    lines = []
    if past:
        lines.append(f"inf = layer never merges: layers {past[0]}..{past[-1]} come after --feature-layer, "
                     "so LLaVA never runs them")  # fmt: skip
    if idle:
        lines.append(f"inf = layer never merges: layers {', '.join(map(str, idle))} had no merges to make at "
                     "this target")  # fmt: skip
    return lines


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """The `dymu.Options` switches as flags (every fast path can be switched off)."""
    group = parser.add_argument_group("fast paths (dymu.Options)")
    group.add_argument(
        "--no-fused-rope", action="store_true", help="VTU gather + RoPE with torch ops, not Triton"
    )
    group.add_argument(
        "--no-fused-rows", action="store_true",
        help="decoder norms, residual adds and SiLU*up as the modules, not Triton kernels",
    )  # fmt: skip
    group.add_argument(
        "--no-fused-remerge",
        action="store_true",
        help="VTU remerge as float32 index_add_, not the Triton segment mean",
    )
    group.add_argument(
        "--no-kv-sink", action="store_true",
        help="the DyMU prefill keeps its own keys and values (copied into the graph decode's buffer at load)",
    )  # fmt: skip
    group.add_argument(
        "--no-cuda-graphs", action="store_true", help="run the DToMe tower eagerly, not as CUDA graphs"
    )
    group.add_argument(
        "--no-compile-tower", action="store_true",
        help="replay the DToMe tower's graph without torch.compile'd blocks (no compile on first use)",
    )  # fmt: skip
    group.add_argument(
        "--graph-segment", type=int, default=Options.graph_segment,
        help="tower blocks per CUDA graph (0: the whole tower, one capture per batch size)",
    )  # fmt: skip
    group.add_argument(
        "--prefill-graph-batch", type=int, default=Options.prefill_graph_batch,
        help="replay the VTU prefill as a CUDA graph for batches up to this size (0: never)",
    )  # fmt: skip
    group.add_argument(
        "--deterministic-remerge", action="store_true", help="VTU remerge by matmul (no atomics)"
    )


def options_from(args: argparse.Namespace) -> Options:
    return Options(fused_rope=not args.no_fused_rope, fused_rows=not args.no_fused_rows,
                   fused_remerge=not args.no_fused_remerge, kv_sink=not args.no_kv_sink,
                   cuda_graphs=not args.no_cuda_graphs,
                   compile_tower=not args.no_compile_tower,
                   graph_segment=args.graph_segment, prefill_graph_batch=args.prefill_graph_batch,
                   deterministic_remerge=args.deterministic_remerge)  # fmt: skip


def cmd_infer(args: argparse.Namespace) -> int:
    """Answer a prompt about one or more images with DyMU-LLaVA (default: the tiny model)."""

    if args.max_new_tokens < 1:
        raise DymuError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    dtype_from(args.dtype)
    _device(args.device)
    if args.model_path is not None:
        read_config(args.model_path)  # fail on a bad model path before touching the images
    images = [load_image(p) for p in args.image] if args.image else None
    # what the default pictures show (the right answer to the default question)
    shows: list[str] | None = None
    thresholds = load_thresholds(args.thresholds) if args.thresholds else None  # fail before loading a model
    if args.model_path is None:
        paths = ensure_tiny_checkpoints()
        model_path = paths[
            "llava-hf-tiny-safetensors" if args.family != "legacy" else "llava-v1.5-tiny-safetensors"
        ]
        if images is None:
            pictures = shapes.sample_pictures()
            images = [image for _, image in pictures]
            shows = [scene.answer("describe") for scene, _ in pictures]
        if thresholds is None and not args.stock:
            thresholds = tiny_thresholds()
        note = "embedded tiny LLaVA-1.5, trained on coloured-shape pictures (ask about colour, shape, count)"
    else:
        model_path = Path(args.model_path)
        note = str(model_path)
        if images is None:
            raise DymuError("--image is required with --model-path")
    if args.stock:
        thresholds = None
    model = load(model_path, thresholds=thresholds, vtu=args.vtu, family=args.family,
                 dtype=dtype_from(args.dtype), device=_device(args.device), options=options_from(args))  # fmt: skip
    prompt = args.prompt if args.raw_prompt else format_prompt(args.prompt, args.conv_mode)
    answers = model.generate([prompt] * len(images), images, max_new_tokens=args.max_new_tokens)
    names = args.image or [f"sample-{i}" for i in range(len(images))]
    rows = [
        {"image": str(name), "answer": a.text, "visual_tokens": a.visual_tokens, "token_ids": a.token_ids}
        for name, a in zip(names, answers, strict=True)
    ]
    for row, what in zip(rows, shows or [], strict=False):
        row["shows"] = what
    if args.json:
        print(strict_json({"model": str(model_path), "family": model.family, "vtu": args.vtu,
                          "dymu": thresholds is not None, "results": rows}))  # fmt: skip
    else:
        print(
            f"model: {note} [{model.family}], vtu={args.vtu}, {'DyMU' if thresholds is not None else 'stock'}"
        )
        for row in rows:
            shown = f" (shows {row['shows']})" if "shows" in row else ""
            print(f"{row['image']}{shown}: [{row['visual_tokens']} visual tokens] {row['answer']!r}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print the installed stack, the patch set it selects, and each fix's verify() result."""
    packages = ["torch", "transformers", "tokenizers", "safetensors", "huggingface-hub", "accelerate",
                "numpy", "pillow", "llava-torch"]  # fmt: skip
    info: dict = {
        "python": platform.python_version(),
        **{p: str(installed(p) or "not installed") for p in packages},
    }
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    fixes = check_all(negative=args.negative)
    info["patch_set"] = [f["fix"] for f in fixes if f["needed"] == "yes"]
    info["fixes"] = fixes
    if args.json:
        print(strict_json(info))
    else:
        for key, value in info.items():
            if key not in ("fixes", "patch_set"):
                print(f"{key:>16}: {value}")
        print(f"{'patch set':>16}: {', '.join(info['patch_set']) or '(none)'}")
        for f in fixes:
            neg = (
                f" | {NEGATIVE_WORDS.get(f['negative'], 'negative control: ' + f['negative'])}"
                if args.negative
                else ""
            )
            print(
                f"  {f['fix']:<16} needed={f['needed']:<3} verify={f['verify']:<7} {f.get('detail', '')}{neg}"
            )
    failed = [f["fix"] for f in fixes if f["verify"] == "failed"]
    return 1 if failed else 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Copy a .bin checkpoint directory with its weights rewritten as safetensors."""

    print(f"wrote {convert_to_safetensors(args.src, args.dst)}")
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    """Re-render reports/matrix.{json,md,html} from the cell results (`dymu matrix report`)."""

    return report.main([str(args.reports)])


def cmd_bench(args: argparse.Namespace) -> int:
    """Stock vs DyMU on a data file (their format), side by side; `tower` / `llava`: microbenchmarks."""
    return bench_command.main(args.rest)


def cmd_data(args: argparse.Namespace) -> int:
    """Write a benchmark data file (their format, with answers) from VLMEvalKit / COCO files."""
    return importers.main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dymu", description="DyMU for LLaVA-1.5 (DToMe + VTU)")
    sub = parser.add_subparsers(dest="command", required=True)

    cal = sub.add_parser("calibrate", help=cmd_calibrate.__doc__)
    cal.add_argument("--model", help="CLIP, liuhaotian LLaVA or llava-hf directory (default: the tiny model)")
    cal.add_argument("--images", help="folder of calibration images (default with the tiny model: samples)")
    cal.add_argument("--target-tokens", type=int, default=None,
                     help="mean tokens at the feature layer (default: patches / 8: 72 for LLaVA-1.5's 576 patches, "
                     "8 for the tiny model's 64)")  # fmt: skip
    cal.add_argument("--batch-size", type=int, default=64)
    cal.add_argument("--feature-layer", type=int, default=-2)
    cal.add_argument("--out", type=Path, default=Path("dymu-thresholds.safetensors"))
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--dtype", default="float32")
    cal.add_argument("--no-progress", action="store_true")
    cal.add_argument("--json", action="store_true", help="print a JSON summary")
    cal.set_defaults(func=cmd_calibrate)

    inf = sub.add_parser("infer", help=cmd_infer.__doc__)
    inf.add_argument("--model-path", help="llava-hf or liuhaotian checkpoint dir (default: the tiny model)")
    inf.add_argument("--image", nargs="+", help="image file(s) (default with the tiny model: samples)")
    inf.add_argument(
        "--prompt", default="What is shown in this image?", help="question (wrapped in LLaVA's template)"
    )
    inf.add_argument(
        "--raw-prompt", action="store_true", help="use --prompt as the full prompt (must hold <image>)"
    )
    inf.add_argument("--thresholds", help=".pth / .safetensors / .json thresholds (none: stock tower)")
    inf.add_argument(
        "--stock", action="store_true", help="no merging (stock LLaVA) even for the tiny default"
    )
    inf.add_argument("--vtu", choices=["fast", "none"], default="fast")
    inf.add_argument(
        "--conv-mode", choices=sorted(CONV_SYSTEMS), default="llava_v1", help="conversation template"
    )
    inf.add_argument("--family", choices=["auto", "hf", "legacy"], default="auto")
    inf.add_argument("--max-new-tokens", type=int, default=32)
    inf.add_argument("--device", default="cpu")
    inf.add_argument("--dtype", default="float32")
    inf.add_argument("--json", action="store_true")
    add_option_flags(inf)
    inf.set_defaults(func=cmd_infer)

    doc = sub.add_parser("doctor", help=cmd_doctor.__doc__)
    doc.add_argument("--json", action="store_true")
    doc.add_argument("--negative", action="store_true", help="also run each needed fix's negative control")
    doc.set_defaults(func=cmd_doctor)

    conv = sub.add_parser("convert", help=cmd_convert.__doc__)
    conv.add_argument("src", type=Path, help="checkpoint directory with pytorch_model*.bin")
    conv.add_argument("dst", type=Path, help="new directory to write")
    conv.set_defaults(func=cmd_convert)

    mat = sub.add_parser("matrix", help=cmd_matrix.__doc__)
    mat.add_argument("action", choices=["report"])
    mat.add_argument("--reports", type=Path, default=Path("reports"))
    mat.set_defaults(func=cmd_matrix)

    bench = sub.add_parser("bench", help=cmd_bench.__doc__, add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="see dymu bench --help")
    bench.set_defaults(func=cmd_bench)

    data = sub.add_parser("data", help=cmd_data.__doc__, add_help=False)
    data.add_argument(
        "rest", nargs=argparse.REMAINDER, help="mmbench --tsv F --out F | coco ... (see dymu data --help)"
    )
    data.set_defaults(func=cmd_data)
    return parser


# commands whose own parser takes every argument (argparse's REMAINDER drops leading options)
PASS_THROUGH = {"bench": cmd_bench, "data": cmd_data}


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:
        args = argparse.Namespace(func=PASS_THROUGH[argv[0]], rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DymuError as err:
        print(f"dymu: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dymu: interrupted", file=sys.stderr)
        return 130
