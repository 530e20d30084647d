"""Load the CLIP vision tower (and its image processor) behind any supported model path.

- a CLIP directory (`model_type` clip / clip_vision_model);
- a liuhaotian LLaVA-1.5 checkpoint (`llava_llama`): follows `mm_vision_tower`, which must
  be a local directory here (no downloads);
- a llava-hf checkpoint (`llava`): the tower inside `LlavaForConditionalGeneration`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DymuError
from .versions import dtype_kwargs


def read_config(model_path: str | Path) -> dict[str, Any]:
    """The `config.json` of a model directory, with one-line errors for the usual mistakes."""
    path = Path(model_path)
    if not path.exists():
        raise DymuError(f"{path}: model path does not exist; pass a local checkpoint directory")
    if not path.is_dir():
        raise DymuError(f"{path}: model path is a file; pass the checkpoint directory that holds config.json")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise DymuError(f"{path}: no config.json; pass a Hugging Face-style checkpoint directory")
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DymuError(f"{cfg_file}: malformed JSON ({err})") from None


def _find_clip(model: nn.Module) -> nn.Module:
    from transformers import CLIPVisionModel

    for module in model.modules():
        if isinstance(module, CLIPVisionModel):
            return module
    raise DymuError(f"{type(model).__name__} holds no CLIPVisionModel")


def load_vision_tower(
    model_path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """(CLIPVisionModel in eval mode, CLIPImageProcessor) for a CLIP, liuhaotian or llava-hf path."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    path = Path(model_path)
    cfg = read_config(path)
    model_type = cfg.get("model_type")
    if model_type in ("clip", "clip_vision_model"):
        tower = CLIPVisionModel.from_pretrained(str(path), **dtype_kwargs(dtype))
        processor = CLIPImageProcessor.from_pretrained(str(path))
    elif model_type == "llava_llama":
        tower_path = Path(str(cfg.get("mm_vision_tower", "")))
        if not tower_path.is_dir():
            raise DymuError(
                f"{path}: mm_vision_tower '{tower_path}' is not a local directory; download the CLIP tower "
                "and set mm_vision_tower in config.json to its path"
            )
        return load_vision_tower(tower_path, dtype, device)
    elif model_type == "llava":
        from transformers import LlavaForConditionalGeneration

        llava = LlavaForConditionalGeneration.from_pretrained(str(path), **dtype_kwargs(dtype))
        tower = _find_clip(llava)
        processor = CLIPImageProcessor.from_pretrained(str(path))
    else:
        raise DymuError(
            f"{path}: unsupported model_type '{model_type}'; expected a CLIP, liuhaotian llava_llama or llava-hf checkpoint"
        )
    return tower.to(device).eval(), processor
