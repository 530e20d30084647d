"""Running dymu's Triton kernels on CPU tensors in Triton's interpreter, for the kernel tests.

TRITON_INTERPRET=1 must be set before triton is imported, hence a subprocess. The interpreter
rounds float32 -> bfloat16 toward zero where compiled kernels round to nearest, so bfloat16
results are compared within one unit in the last place."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def skip_without_an_interpreter() -> None:
    triton = pytest.importorskip("triton")  # needs setuptools on triton <= 3.1 (the cells pin it)
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 2):
        # 2.x has no CPU interpreter for it; 3.1's wants `tl` as a module global and constexpr
        # annotations as objects, and even then returned wrong values here (torch 2.5.1 cell)
        pytest.skip(f"triton {triton.__version__}: its interpreter cannot run this kernel on CPU tensors")


def run_interpreted(code: str, done_line: str) -> None:
    """Run `code` with TRITON_INTERPRET=1 in a fresh interpreter; it must print `done_line`."""
    skip_without_an_interpreter()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done_line in done.stdout, done.stderr[-3000:]
