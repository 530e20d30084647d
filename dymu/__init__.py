"""DyMU for LLaVA-1.5: dynamic token merging in CLIP (DToMe) and virtual token unmerging (VTU).

Public API (kept small on purpose):
- `load`, `apply`: a LLaVA-1.5 model of either family with DyMU, ready to `generate`;
- `Options`: switches for the fast paths (fused kernels, CUDA graphs, deterministic remerge);
- `load_thresholds`, `save_thresholds`: per-layer merge thresholds in the official `.pth`,
  our safetensors, or a JSON list;
- `encode_images`: the DToMe CLIP tower on any HF `CLIPVisionModel`;
- `calibrate`: thresholds for a target token count.

The names resolve on first use, so `import dymu.matrix` (the matrix tooling, which runs in
nox's own interpreter) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Answer": "api", "DymuLlava": "api", "apply": "api", "format_prompt": "api", "load": "api",
    "calibrate": "calibration", "DymuError": "errors", "Options": "options",
    "load_thresholds": "thresholds", "save_thresholds": "thresholds",
    "TowerOutput": "tower", "encode_images": "tower",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dymu' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
