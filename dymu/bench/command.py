"""`dymu bench`: flags of the users' `run_benchmark_dymu.py` (`--model-path`, `--data-file`,
`--max-new-tokens`, `--report-file`) plus everything their script lacked. `dymu bench tower` and
`dymu bench llava` are the random-weight microbenchmarks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..api import CONV_SYSTEMS
from ..errors import run_main
from ..options import DECODE_MODES
from ..quiet import quiet_libraries
from . import llava as llava_bench
from . import report as bench_report
from . import tower as tower_bench
from .data import load_data_file
from .run import BenchConfig, data_path, default_data, jsonl_path, run

MICRO = {"tower": tower_bench.main, "llava": llava_bench.main}
DEFAULT_NEW_TOKENS = 64  # as run_benchmark_dymu.py
TINY_NEW_TOKENS = (
    16  # the tiny model's answers are short; 64 steps x 2 modes x 7 batches took minutes on 2 cores
)
TINY_MODELS = ("tiny", "tiny-legacy")


def new_tokens(args: argparse.Namespace) -> int:
    """--max-new-tokens, or its default for the model asked for."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    return TINY_NEW_TOKENS if args.model_path in TINY_MODELS else DEFAULT_NEW_TOKENS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dymu bench", description=__doc__.splitlines()[0],
                                epilog="microbenchmarks: dymu bench tower --help, dymu bench llava --help")  # fmt: skip
    p.add_argument("--model-path", default="tiny",
                   help="a liuhaotian or llava-hf checkpoint dir, `tiny` (default: the embedded model), `tiny-legacy`, "
                   "or `random:llava-1.5-7b` (the exact architecture, random weights, built on --device)")  # fmt: skip
    p.add_argument("--data-file", default=None, help="their JSON format; `sample` / `sample-mmbench`: the packaged "
                   "photos with COCO / MMBench prompts; `sample-shapes` / `sample-shapes-coco`: the tiny model's task "
                   "(default: sample-shapes-coco on the tiny model, else sample)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default {DEFAULT_NEW_TOKENS}; {TINY_NEW_TOKENS} on the embedded tiny model, so the no-argument "
                   "run stays short on a CPU")  # fmt: skip
    p.add_argument("--report-file", default="report_dymu.json", help="JSON report; .md, per-mode .json, .jsonl "
                   "and plots are written next to it")  # fmt: skip
    p.add_argument("--thresholds", help="DyMU thresholds file (default: calibrated on the data's images)")
    p.add_argument(
        "--modes", default="stock,dymu", help="comma list; variants: NAME:vtu=none, NAME:thresholds=F"
    )
    p.add_argument("--vtu", choices=["fast", "none"], default="fast")
    p.add_argument("--conv-mode", choices=sorted(CONV_SYSTEMS), default="llava_v1",
                   help="conversation template (llava_v1: what the benchmark files were run with)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=1, help="1 = latency; larger = throughput (labelled)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1, help="batches (of --batch-size) run per mode before timing; "
                   "not reported")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (every mode)")
    p.add_argument("--image-root", help="folder relative image paths are resolved against first")
    p.add_argument("--resume", action="store_true", help="continue from the .jsonl of an interrupted run")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens (pure timing)")
    p.add_argument("--decode", choices=list(DECODE_MODES), default="auto",
                   help="decode path (graph: dymu's replayed step over a static KV buffer; static: transformers' "
                        "StaticCache generate; dynamic: its growing cache; auto: graph on CUDA, dynamic on the CPU); "
                        "per mode: NAME:decode=graph")  # fmt: skip
    p.add_argument(
        "--target-tokens", type=int, default=None, help="calibration target (default: patches / 8)"
    )
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report's path list and summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MICRO:
        return MICRO[argv[0]](argv[1:])
    args = parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = BenchConfig(
        model_path=args.model_path, data_file=args.data_file or default_data(args.model_path),
        max_new_tokens=new_tokens(args),
        report_file=args.report_file, thresholds=args.thresholds, modes=args.modes, vtu=args.vtu,
        batch_size=args.batch_size, limit=args.limit, offset=args.offset, warmup=args.warmup, seed=args.seed,
        temperature=args.temperature, image_root=args.image_root, resume=args.resume, device=device,
        dtype=args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"), ignore_eos=args.ignore_eos,
        decode=args.decode, conv_mode=args.conv_mode,
        target_tokens=args.target_tokens, progress=not args.no_progress,
    )  # fmt: skip
    info, rows, interrupted = run(cfg, ["dymu", "bench", *argv])
    data = load_data_file(data_path(cfg.data_file))
    built = bench_report.build(info, rows, data, interrupted)
    written = bench_report.write(built, Path(cfg.report_file), with_plots=not args.no_plots)
    if args.json:
        print(bench_report.dumps({"written": [str(p) for p in written],
                                  "summary": {n: m["summary"] for n, m in built["modes"].items()}}), end="")  # fmt: skip
    else:
        print(bench_report.markdown(built))
        print(f"wrote {', '.join(str(p) for p in written)} (rows: {jsonl_path(Path(cfg.report_file))})")
    if interrupted:
        print(f"dymu: interrupted; the partial report is written; continue with --resume (rows in "
              f"{jsonl_path(Path(cfg.report_file))})", file=sys.stderr)  # fmt: skip
        return 130
    return 0


if __name__ == "__main__":
    run_main(main)
