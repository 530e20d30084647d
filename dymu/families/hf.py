"""The llava-hf family: `transformers.LlavaForConditionalGeneration` checkpoints, loaded with
`from_pretrained` (never trust_remote_code)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlavaForConditionalGeneration

from ..compat.shims import dtype_kwargs, image_tokens_per_image
from .base import IMAGE, LlavaParts, StockOutput, common_parts, first_module, named_module


def stock_inputs(parts: LlavaParts, prompt_ids: list[list[int]], pixel_values: torch.Tensor,
                 pad_id: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """Left-padded inputs for stock `LlavaForConditionalGeneration.generate` on this transformers."""
    patches = (parts.vision.config.image_size // parts.vision.config.patch_size) ** 2
    per_image = image_tokens_per_image(patches)
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


class HfFamily:
    name = "hf"

    def claims(self, config: dict[str, Any]) -> bool:
        return config.get("model_type") == "llava" and "mm_vision_tower" not in config

    def hidden_size(self, config: dict[str, Any]) -> int | None:
        text = config.get("text_config")
        return int(text["hidden_size"]) if isinstance(text, dict) and "hidden_size" in text else None

    def load(self, path: Path, dtype: torch.dtype, device: str) -> tuple[nn.Module, Any, Any]:
        model = LlavaForConditionalGeneration.from_pretrained(str(path), **dtype_kwargs(dtype))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        image_processor = CLIPImageProcessor.from_pretrained(str(path))
        return model.to(device).eval(), tokenizer, image_processor

    def parts(self, model: nn.Module) -> LlavaParts:
        config = model.config
        select = (
            "patch" if getattr(config, "vision_feature_select_strategy", "default") == "default" else "full"
        )
        return common_parts(
            model, self.name, named_module(model, ("multi_modal_projector",), "multimodal projector"),
            int(getattr(config, "vision_feature_layer", -2)), select,
            int(getattr(config, "image_token_index", None) or config.image_token_id),
            pad_image=False,  # llava-hf's processor resizes and centre-crops; it does not pad
        )  # fmt: skip

    def tokenize(self, tokenizer: Any, prompt: str, parts: LlavaParts) -> list[int]:
        return [IMAGE if t == parts.image_token_id else t for t in tokenizer(prompt).input_ids]

    def stock_generate(self, parts: LlavaParts, prompt_ids: list[list[int]], pixel_values: torch.Tensor,
                       max_new_tokens: int, pad_id: int = 0) -> StockOutput:  # fmt: skip
        inputs = stock_inputs(parts, prompt_ids, pixel_values, pad_id)
        with torch.no_grad():
            out = parts.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       return_dict_in_generate=True, output_scores=True, pad_token_id=pad_id)  # fmt: skip
        return StockOutput(out.sequences[:, inputs["input_ids"].shape[1] :], out.scores[0])

    def vision_tower(self, path: Path, config: dict[str, Any], dtype: torch.dtype) -> tuple[nn.Module, Any]:
        llava = LlavaForConditionalGeneration.from_pretrained(str(path), **dtype_kwargs(dtype))
        return first_module(llava, CLIPVisionModel, "CLIP vision tower"), CLIPImageProcessor.from_pretrained(
            str(path)
        )
