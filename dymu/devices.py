"""`--device` and `--dtype` strings to torch objects, with one-line errors naming what exists."""

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
