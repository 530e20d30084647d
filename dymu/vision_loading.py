"""The CLIP vision tower (and its image processor) behind any supported model path: a CLIP
directory, or a checkpoint of either family (which says where its tower is)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import check_weights
from .errors import DymuError
from .families import CLIP_TYPES, FAMILIES, detect, read_config
from .families.base import load_clip


def load_vision_tower(
    model_path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """(CLIPVisionModel in eval mode, CLIPImageProcessor) for a CLIP, liuhaotian or llava-hf path."""
    path = Path(model_path)
    config = read_config(path)
    if config.get("model_type") in CLIP_TYPES:
        tower, processor = load_clip(path, dtype)
    elif any(family.claims(config) for family in FAMILIES.values()):
        family = detect(path, config)
        if family.name == "hf":  # the tower is inside these weights (legacy towers live in their own dir)
            check_weights(path)
        tower, processor = family.vision_tower(path, config, dtype)
    else:
        raise DymuError(
            f"{path}: unsupported model_type '{config.get('model_type')}'; expected a CLIP, liuhaotian "
            "llava_llama or llava-hf checkpoint"
        )
    return tower.to(device).eval(), processor
