"""The one-call API: `dymu.load(path)` / `dymu.apply(model)` -> a generate-ready DyMU LLaVA."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import DymuError
from .generation import PreparedBatch, generate_prepared, prepare
from .images import load_image, mean_fill, pad_to_square
from .llava import LlavaParts, find_parts
from .thresholds import load_thresholds
from .vision_loading import read_config

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def format_prompt(question: str) -> str:
    """LLaVA-1.5's conversation template (vicuna_v1) around one image and a question."""
    return f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"


@dataclass
class Answer:
    """One generated answer: text, new token ids, and the visual tokens the LLM received."""

    text: str
    token_ids: list[int]
    visual_tokens: int


class DymuLlava:
    """A LLaVA-1.5 model of either family with DyMU applied; `generate` takes prompts and images."""

    def __init__(self, parts: LlavaParts, tokenizer: Any, image_processor: Any, thresholds, vtu: str):
        self.parts = parts
        self.model = parts.model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.thresholds = thresholds
        self.vtu = vtu

    @property
    def family(self) -> str:
        return self.parts.family

    def tokenize(self, prompt: str) -> list[int]:
        """Prompt ids with the IMAGE placeholder, tokenized as the family's own code does."""
        if self.parts.family == "hf":
            from .hf_llava import tokenize

            return tokenize(self.tokenizer, prompt, self.parts.image_token_id)
        from .legacy_llava import tokenize

        return tokenize(self.tokenizer, prompt)

    def pixel_values(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """The family's own preprocessing: llava-hf resizes/crops, liuhaotian pads to square first."""
        pil = [img if isinstance(img, Image.Image) else load_image(img) for img in images]
        fill = mean_fill(self.image_processor)
        pil = [
            pad_to_square(img.convert("RGB"), fill) if self.parts.pad_image else img.convert("RGB")
            for img in pil
        ]
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    def prepare(self, prompts: Sequence[str], images: Sequence[Image.Image | str | Path]) -> PreparedBatch:
        """DyMU prefill of a batch (one image per prompt) into a cache, ready for `generate`."""
        ids = [self.tokenize(p) for p in prompts]
        return prepare(self.parts, ids, self.pixel_values(images), self.thresholds, self.vtu)

    def generate(
        self,
        prompts: str | Sequence[str],
        images: Image.Image | str | Path | Sequence[Image.Image | str | Path],
        max_new_tokens: int = 32,
        **kwargs: Any,
    ) -> list[Answer]:
        """Greedy answers for full prompts (use `format_prompt` for LLaVA's template)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = [images] if isinstance(images, (Image.Image, str, Path)) else list(images)
        batch = self.prepare(prompts, images)
        out = generate_prepared(self.parts, batch, max_new_tokens, **kwargs)
        new = out.sequences[:, batch.virtual_ids.shape[1] :]
        answers = []
        for row, n_visual in zip(new.tolist(), batch.visual_tokens, strict=True):
            text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
            answers.append(Answer(text, row, n_visual))
        return answers


def _thresholds(thresholds, parts: LlavaParts) -> torch.Tensor | None:
    layers = parts.vision.config.num_hidden_layers
    if thresholds is None:
        return None
    if isinstance(thresholds, (str, Path)):
        return load_thresholds(thresholds, num_layers=layers)
    tau = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
    if tau.numel() != layers:
        raise DymuError(f"{tau.numel()} thresholds given for a {layers}-layer vision tower")
    return tau


def apply(
    model: torch.nn.Module,
    thresholds: torch.Tensor | str | Path | None,
    vtu: str = "fast",
    tokenizer: Any = None,
    image_processor: Any = None,
) -> DymuLlava:
    """DyMU on an already-loaded LLaVA-1.5 model of either family (`thresholds=None`: stock)."""
    parts = find_parts(model)
    return DymuLlava(parts, tokenizer, image_processor, _thresholds(thresholds, parts), vtu)


def detect_family(model_path: str | Path) -> str:
    """'hf' for llava-hf checkpoints, 'legacy' for liuhaotian ones, from config.json alone."""
    cfg = read_config(model_path)
    if "mm_vision_tower" in cfg or cfg.get("model_type") == "llava_llama":
        return "legacy"
    if cfg.get("model_type") == "llava":
        return "hf"
    raise DymuError(
        f"{model_path}: unsupported model_type {cfg.get('model_type')!r}; "
        "expected a llava-hf ('llava') or liuhaotian ('llava_llama') LLaVA-1.5 checkpoint"
    )


def load(
    model_path: str | Path,
    thresholds: torch.Tensor | str | Path | None = None,
    vtu: str = "fast",
    family: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> DymuLlava:
    """Load a LLaVA-1.5 checkpoint of either family and apply DyMU in one call."""
    from .checkpoints import check_weights

    family = detect_family(model_path) if family == "auto" else family
    check_weights(model_path)
    if family == "hf":
        from .hf_llava import load_hf

        model, tokenizer, image_processor = load_hf(model_path, dtype, device)
    elif family == "legacy":
        from .legacy_llava import load_legacy

        model, tokenizer, image_processor = load_legacy(model_path, dtype, device)
    else:
        raise DymuError(f"family={family!r} is not one of auto, hf, legacy")
    return apply(model, thresholds, vtu, tokenizer, image_processor)
