"""The liuhaotian family: the legacy `llava` package's `LlavaLlamaForCausalLM`, loaded through
its own `llava.model.builder.load_pretrained_model` with the patch set applied at run time
(`dymu.compat.legacy`; never vendored or edited on disk)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compat.legacy import apply_patch_set, builder_dtype, import_legacy, legacy_tokenizer
from ..errors import DymuError
from .base import IMAGE, LlavaParts, StockOutput, common_parts, load_clip, named_module


class LegacyFamily:
    name = "legacy"

    def claims(self, config: dict[str, Any]) -> bool:
        return config.get("model_type") == "llava_llama" or "mm_vision_tower" in config

    def hidden_size(self, config: dict[str, Any]) -> int | None:
        return int(config["hidden_size"]) if isinstance(config.get("hidden_size"), int) else None

    def load(self, path: Path, dtype: torch.dtype, device: str) -> tuple[nn.Module, Any, Any]:
        legacy = import_legacy()
        apply_patch_set()
        from llava.model.builder import load_pretrained_model  # noqa: PLC0415 - optional dependency

        # model_name only has to contain "llava" for the builder to pick LlavaLlamaForCausalLM
        with builder_dtype(legacy.LlavaLlamaForCausalLM, dtype):
            _, model, image_processor, _ = load_pretrained_model(
                str(path), None, "llava-v1.5", device_map=device, device=device
            )
        return model.to(device=device, dtype=dtype).eval(), legacy_tokenizer(path), image_processor

    def parts(self, model: nn.Module) -> LlavaParts:
        config = model.config
        return common_parts(
            model, self.name, named_module(model, ("mm_projector",), "multimodal projector"),
            int(getattr(config, "mm_vision_select_layer", -2)), getattr(config, "mm_vision_select_feature", "patch"),
            image_token_id=0, pad_image=getattr(config, "image_aspect_ratio", "square") == "pad",
        )  # fmt: skip

    def tokenize(self, tokenizer: Any, prompt: str, parts: LlavaParts) -> list[int]:
        """Through the package's own `tokenizer_image_token`."""
        from llava.mm_utils import tokenizer_image_token  # noqa: PLC0415 - optional dependency

        return list(tokenizer_image_token(prompt, tokenizer, IMAGE))

    def stock_generate(self, parts: LlavaParts, prompt_ids: list[list[int]], pixel_values: torch.Tensor,
                       max_new_tokens: int, pad_id: int = 0) -> StockOutput:  # fmt: skip
        """The package's own generate(images=...), one prompt at a time (it re-embeds the image)."""
        device = parts.decoder.embed_tokens.weight.device
        dtype = next(parts.vision.parameters()).dtype
        tokens, scores = [], []
        for ids, pixels in zip(prompt_ids, pixel_values, strict=True):
            with torch.no_grad():
                out = parts.model.generate(
                    torch.tensor([ids], device=device), images=pixels[None].to(device, dtype),
                    max_new_tokens=max_new_tokens, do_sample=False,
                    return_dict_in_generate=True, output_scores=True, pad_token_id=pad_id,
                )  # fmt: skip
            tokens.append(out.sequences[0, -len(out.scores) :])  # one score per new token
            scores.append(out.scores[0][0])
        # a prompt whose answer ended early (EOS) is shorter: pad on the right, as a batched generate does
        width = max(len(t) for t in tokens)
        padded = [torch.cat([t, t.new_full((width - len(t),), pad_id)]) for t in tokens]
        return StockOutput(torch.stack(padded), torch.stack(scores))

    def vision_tower(self, path: Path, config: dict[str, Any], dtype: torch.dtype) -> tuple[nn.Module, Any]:
        """The CLIP directory `mm_vision_tower` names (it must be local: nothing is downloaded)."""
        tower_path = Path(str(config.get("mm_vision_tower", "")))
        if not tower_path.is_dir():
            raise DymuError(
                f"{path}: mm_vision_tower '{tower_path}' is not a local directory; download the CLIP tower "
                "and set mm_vision_tower in config.json to its path"
            )
        return load_clip(tower_path, dtype)
