"""The one-call API: `dymu.load(path)` / `dymu.apply(model)` -> a generate-ready DyMU LLaVA."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import families
from .checkpoints import check_weights
from .errors import DymuError
from .families import Family, LlavaParts, split_at_image
from .generation import PreparedBatch, generate_prepared, prepare
from .images import preprocess
from .options import DEFAULT, Options
from .thresholds import load_thresholds

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
ImageInput = Image.Image | str | Path


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

    def __init__(self, family: Family, parts: LlavaParts, tokenizer: Any, image_processor: Any,
                 thresholds: torch.Tensor | None, vtu: str, options: Options = DEFAULT) -> None:  # fmt: skip
        self.family_impl = family
        self.parts = parts
        self.model = parts.model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.thresholds = thresholds
        self.vtu = vtu
        self.options = options

    @property
    def family(self) -> str:
        return self.family_impl.name

    def tokenize(self, prompt: str) -> list[int]:
        """Prompt ids with the IMAGE placeholder, tokenized as the family's own code does."""
        ids = self.family_impl.tokenize(self.tokenizer, prompt, self.parts)
        split_at_image(ids)  # exactly one <image>, followed by text
        return ids

    def pixel_values(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """The family's own preprocessing: llava-hf resizes/crops, liuhaotian pads to square first."""
        return preprocess(images, self.image_processor, pad=self.parts.pad_image)

    def prepare(self, prompts: Sequence[str], images: Sequence[ImageInput]) -> PreparedBatch:
        """DyMU prefill of a batch (one image per prompt) into a cache, ready for `generate`."""
        ids = [self.tokenize(p) for p in prompts]
        return prepare(self.parts, ids, self.pixel_values(images), self.thresholds, self.vtu, self.options)

    def generate(
        self,
        prompts: str | Sequence[str],
        images: ImageInput | Sequence[ImageInput],
        max_new_tokens: int = 32,
        **kwargs: Any,
    ) -> list[Answer]:
        """Greedy answers for full prompts (use `format_prompt` for LLaVA's template)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = [images] if isinstance(images, (Image.Image, str, Path)) else list(images)
        batch = self.prepare(prompts, images)
        out = generate_prepared(self.parts, batch, max_new_tokens, self.options, **kwargs)
        new = out.sequences[:, batch.virtual_ids.shape[1] :]
        answers = []
        for row, n_visual in zip(new.tolist(), batch.visual_tokens, strict=True):
            text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
            answers.append(Answer(text, row, n_visual))
        return answers


def _thresholds(thresholds: torch.Tensor | str | Path | None, parts: LlavaParts) -> torch.Tensor | None:
    layers = parts.vision.config.num_hidden_layers
    if thresholds is None:
        return None
    if isinstance(thresholds, (str, Path)):
        return load_thresholds(thresholds, num_layers=layers)
    tau = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
    if tau.numel() != layers:
        raise DymuError(f"{tau.numel()} thresholds given for a {layers}-layer vision tower")
    return tau


def _build(family: Family, model: torch.nn.Module, thresholds, vtu: str, tokenizer: Any, image_processor: Any,
           options: Options) -> DymuLlava:  # fmt: skip
    parts = family.parts(model)
    return DymuLlava(family, parts, tokenizer, image_processor, _thresholds(thresholds, parts), vtu, options)


def apply(
    model: torch.nn.Module,
    thresholds: torch.Tensor | str | Path | None,
    vtu: str = "fast",
    tokenizer: Any = None,
    image_processor: Any = None,
    options: Options = DEFAULT,
) -> DymuLlava:
    """DyMU on an already-loaded LLaVA-1.5 model of either family (`thresholds=None`: stock)."""
    return _build(families.of_model(model), model, thresholds, vtu, tokenizer, image_processor, options)


def load(
    model_path: str | Path,
    thresholds: torch.Tensor | str | Path | None = None,
    vtu: str = "fast",
    family: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    options: Options = DEFAULT,
) -> DymuLlava:
    """Load a LLaVA-1.5 checkpoint of either family and apply DyMU in one call."""
    chosen = families.detect(model_path) if family == "auto" else families.get(family)
    check_weights(model_path)
    model, tokenizer, image_processor = chosen.load(Path(model_path), dtype, device)
    return _build(chosen, model, thresholds, vtu, tokenizer, image_processor, options)
