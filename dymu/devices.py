"""`--device` and `--dtype` strings to torch objects, with one-line errors naming what exists; and
whether the Triton fast paths can run here."""

from __future__ import annotations

import torch

from .errors import DymuError


def dtype_from(name: str) -> torch.dtype:
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise DymuError(
            f"--dtype {name!r}: not a floating-point torch dtype; use float32, bfloat16 or float16"
        )
    return value


def device_from(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DymuError(f"--device {name!r}: not a device; use cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise DymuError(f"--device {name}: dymu runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DymuError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DymuError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def triton_available() -> bool:
    """Whether Triton imports (the CUDA fast paths' kernels; absent in some cells and on macOS)."""
    try:
        import triton  # noqa: F401, PLC0415 - optional dependency
    except ImportError:
        return False
    return True


def kernels_run_on(x: torch.Tensor) -> bool:
    """Whether dymu's Triton kernels run for tensors like `x` (CUDA with Triton; elsewhere the plain path)."""
    return x.is_cuda and triton_available()
