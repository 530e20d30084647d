"""What a checkpoint family provides, and the handles DyMU wires into.

A family (llava-hf, legacy liuhaotian) is chosen once, from `config.json` or a loaded
model's config, and then answers every family question: load, parts, tokenize, stock
generation, and the CLIP tower behind a checkpoint path. Parts are found by type and stable
attribute names, not by version-specific module paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaModel

from ..checkpoints import check_weights
from ..compat.shims import dtype_kwargs
from ..errors import DymuError

IMAGE = -200  # image placeholder in prompt ids (the legacy package's IMAGE_TOKEN_INDEX)


@dataclass
class LlavaParts:
    """Handles on one loaded LLaVA model; `model` is the object whose `generate` decodes."""

    family: str
    model: nn.Module
    vision: nn.Module  # transformers CLIPVisionModel
    projector: nn.Module
    decoder: nn.Module  # a LlamaModel: embed_tokens, layers, norm, config
    lm_head: nn.Module
    feature_layer: int
    image_token_id: int  # id written at image positions of the virtual sequence (never embedded)
    pad_image: bool  # LLaVA-1.5 `image_aspect_ratio == "pad"`


@dataclass
class StockOutput:
    """What stock LLaVA generated: new token ids (B, T) and the first step's logits (B, V)."""

    new_tokens: torch.Tensor
    first_scores: torch.Tensor


class Family(Protocol):
    name: str

    def claims(self, config: dict[str, Any]) -> bool:
        """Whether a config (config.json, or a loaded model's config as a dict) is this family's."""

    def load(self, path: Path, dtype: torch.dtype, device: str) -> tuple[nn.Module, Any, Any]:
        """(model, tokenizer, image processor) through the family's own loading code."""

    def parts(self, model: nn.Module) -> LlavaParts: ...

    def tokenize(self, tokenizer: Any, prompt: str, parts: LlavaParts) -> list[int]:
        """Prompt ids with IMAGE where `<image>` stands, as the family's own code tokenizes."""

    def stock_generate(self, parts: LlavaParts, prompt_ids: list[list[int]], pixel_values: torch.Tensor,
                       max_new_tokens: int, pad_id: int = 0) -> StockOutput:  # fmt: skip
        """Greedy generation by the unmodified model (576 visual tokens per image)."""

    def vision_tower(self, path: Path, config: dict[str, Any], dtype: torch.dtype) -> tuple[nn.Module, Any]:
        """(CLIPVisionModel, CLIPImageProcessor) behind a checkpoint directory of this family."""

    def hidden_size(self, config: dict[str, Any]) -> int | None:
        """The LLM's width as config.json states it (checked against the weights before loading)."""


def split_at_image(ids: list[int]) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the single IMAGE placeholder; the one check of a prompt's shape."""
    if ids.count(IMAGE) != 1:
        raise DymuError(f"a prompt needs exactly one <image> placeholder, found {ids.count(IMAGE)}")
    k = ids.index(IMAGE)
    before, after = ids[:k], ids[k + 1 :]
    if not after:
        raise DymuError("the prompt must end with text after <image> (e.g. '... ASSISTANT:')")
    return before, after


def first_module(model: nn.Module, kind: type, what: str) -> nn.Module:
    for module in model.modules():
        if isinstance(module, kind):
            return module
    raise DymuError(f"{type(model).__name__} has no {what}; is this a LLaVA-1.5 model?")


def named_module(model: nn.Module, suffixes: tuple[str, ...], what: str) -> nn.Module:
    for name, module in model.named_modules():
        if name.split(".")[-1] in suffixes:
            return module
    raise DymuError(f"{type(model).__name__} has no {what} ({' / '.join(suffixes)})")


def common_parts(model: nn.Module, family: str, projector: nn.Module, feature_layer: int, select: str,
                 image_token_id: int, pad_image: bool) -> LlavaParts:  # fmt: skip
    """The parts both families locate the same way (tower and decoder by type)."""
    if select != "patch":
        raise DymuError(
            f"vision feature selection {select!r} keeps CLS; DyMU supports LLaVA-1.5's patch features"
        )
    return LlavaParts(
        family=family,
        model=model,
        vision=first_module(model, CLIPVisionModel, "CLIP vision tower"),
        projector=projector,
        decoder=first_module(model, LlamaModel, "Llama decoder"),
        lm_head=model.get_output_embeddings(),
        feature_layer=feature_layer,
        image_token_id=image_token_id,
        pad_image=pad_image,
    )


def load_clip(path: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(CLIPVisionModel, CLIPImageProcessor) from a CLIP checkpoint directory (its weights checked)."""
    check_weights(path)
    tower = CLIPVisionModel.from_pretrained(str(path), **dtype_kwargs(dtype))
    return tower, CLIPImageProcessor.from_pretrained(str(path))
