"""Benchmarks: stock vs DyMU side by side in one process; the headline is the ratio."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_text_atomic
from ..devices import device_from, dtype_from
from ..jsonsafe import dumps
from ..quiet import quiet_libraries

# the `python -m dymu.bench.*` entry points import transformers classes at module level, and on
# transformers 5 without torchvision that import prints a processor warning: silence it first
quiet_libraries()


def bench_parser(prog: str, description: str, repeats: int) -> argparse.ArgumentParser:
    """The options every benchmark shares (device, dtype, batch sizes, target tokens, repeats, --out)."""
    quiet_libraries()
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--target-tokens", type=int, default=72)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here (atomically)")
    return parser


def bench_dtype(args: argparse.Namespace) -> str:
    """The run's dtype name (default by device), after checking the device and dtype exist."""
    device_from(args.device)
    name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype_from(name)
    return name


def emit(report: dict[str, Any], table: str, out: Path | None) -> int:
    """Print the table and write the JSON report atomically."""
    print(table)
    if out:
        write_text_atomic(out, dumps(report, indent=2) + "\n")
    return 0
