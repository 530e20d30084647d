"""DyMU for LLaVA-1.5: dynamic token merging in CLIP (DToMe) and virtual token unmerging (VTU).

Public API (kept small on purpose):
- `load_thresholds`, `save_thresholds`: per-layer merge thresholds in the official
  `.pth`, our safetensors, or a JSON list;
- `encode_images`: the DToMe CLIP tower on any HF `CLIPVisionModel`;
- `calibrate`: thresholds for a target token count;
- `load`, `apply`: a LLaVA-1.5 model of either family with DyMU, ready to `generate`.
"""

from .api import DymuLlava, apply, format_prompt, load
from .calibrate import calibrate
from .errors import DymuError
from .thresholds import load_thresholds, save_thresholds
from .tower import TowerOutput, encode_images

__all__ = [
    "DymuError",
    "DymuLlava",
    "TowerOutput",
    "apply",
    "calibrate",
    "encode_images",
    "format_prompt",
    "load",
    "load_thresholds",
    "save_thresholds",
]
__version__ = "0.1.0"
