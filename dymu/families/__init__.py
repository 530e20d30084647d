"""Checkpoint families, chosen once: from a directory's config.json (`detect`) or from a
loaded model's config (`of_model`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DymuError
from .base import IMAGE, Family, LlavaParts, StockOutput, split_at_image
from .hf import HfFamily
from .legacy import LegacyFamily

FAMILIES: dict[str, Family] = {"legacy": LegacyFamily(), "hf": HfFamily()}  # legacy first: it claims by key
CLIP_TYPES = ("clip", "clip_vision_model")

__all__ = ["FAMILIES", "IMAGE", "Family", "LlavaParts", "StockOutput", "detect", "get", "of_model",
           "read_config", "split_at_image"]  # fmt: skip


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
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DymuError(f"{cfg_file}: malformed JSON ({err})") from None
    if not isinstance(config, dict):
        raise DymuError(
            f"{cfg_file}: expected a JSON object, got {type(config).__name__}; is this a config.json?"
        )
    return config


def _claimant(config: dict[str, Any]) -> Family | None:
    return next((family for family in FAMILIES.values() if family.claims(config)), None)


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise DymuError(f"family={name!r} is not one of auto, {', '.join(FAMILIES)}")
    return FAMILIES[name]


def detect(model_path: str | Path, config: dict[str, Any] | None = None) -> Family:
    """The family of a checkpoint directory, from config.json alone."""
    config = read_config(model_path) if config is None else config
    family = _claimant(config)
    if family is None:
        raise DymuError(
            f"{model_path}: unsupported model_type {config.get('model_type')!r}; "
            "expected a llava-hf ('llava') or liuhaotian ('llava_llama') LLaVA-1.5 checkpoint"
        )
    return family


def of_model(model: nn.Module) -> Family:
    """The family of an already-loaded model, from its config."""
    family = _claimant(model.config.to_dict())
    if family is None:
        raise DymuError(
            f"{type(model).__name__} is not a LLaVA-1.5 model of a supported family (llava-hf or liuhaotian)"
        )
    return family
