"""The llava-hf family: `transformers.LlavaForConditionalGeneration` checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import DymuError
from .llava import IMAGE, LlavaParts
from .versions import dtype_kwargs, transformers_at_least


def load_hf(path: str | Path, dtype: torch.dtype, device: str) -> tuple[torch.nn.Module, Any, Any]:
    """(model, tokenizer, image processor) through `from_pretrained`; never trust_remote_code."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(path), **dtype_kwargs(dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    image_processor = CLIPImageProcessor.from_pretrained(str(path))
    return model.to(device).eval(), tokenizer, image_processor


def tokenize(tokenizer: Any, prompt: str, image_token_id: int) -> list[int]:
    """Prompt ids with the single `<image>` token replaced by the IMAGE placeholder."""
    ids = tokenizer(prompt).input_ids
    if ids.count(image_token_id) != 1:
        raise DymuError(f"prompt must contain '<image>' exactly once (found {ids.count(image_token_id)})")
    return [IMAGE if t == image_token_id else t for t in ids]


def expands_image_tokens() -> bool:
    """From transformers 4.47 the prompt carries one image token per feature; before, one in all."""
    return transformers_at_least("4.47")


def stock_inputs(parts: LlavaParts, prompt_ids: list[list[int]], pixel_values: torch.Tensor, pad_id: int = 0):
    """Left-padded stock `LlavaForConditionalGeneration` inputs for the installed version."""
    patches = (parts.vision.config.image_size // parts.vision.config.patch_size) ** 2
    per_image = patches if expands_image_tokens() else 1
    rows = []
    for ids in prompt_ids:
        row: list[int] = []
        for t in ids:
            row += [parts.image_token_id] * per_image if t == IMAGE else [t]
        rows.append(row)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, row in enumerate(rows):
        input_ids[b, width - len(row) :] = torch.tensor(row)
        mask[b, width - len(row) :] = 1
    device = parts.decoder.embed_tokens.weight.device
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": mask.to(device),
        "pixel_values": pixel_values.to(device, next(parts.vision.parameters()).dtype),
    }
