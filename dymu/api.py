"""The one-call API: `dymu.load(path)` / `dymu.apply(model)` -> a generate-ready DyMU LLaVA."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import families
from .checkpoints import check_sizes, check_weights
from .errors import DymuError
from .families import Family, LlavaParts, split_at_image
from .generation import PreparedBatch, generate_prepared, id_set, prepare, sink_tokens
from .images import preprocess
from .options import DEFAULT, Options
from .thresholds import load_thresholds, validate_thresholds

# LLaVA-1.5's single-image conversation templates, by the legacy package's names: `llava_v1` is what
# the benchmark files people use were run with; `vicuna_v1` is what LLaVA-1.5's own evaluation uses.
CONV_SYSTEMS = {
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
}
SYSTEM = CONV_SYSTEMS["llava_v1"]
ImageInput = Image.Image | str | Path


def format_prompt(question: str, conv_mode: str = "llava_v1") -> str:
    """One image and a question in a LLaVA-1.5 conversation template (`llava_v1` or `vicuna_v1`:
    the same turns, different system text), as the legacy package's `conv_templates` build it."""
    if conv_mode not in CONV_SYSTEMS:
        raise DymuError(f"conv_mode={conv_mode!r}: use one of {', '.join(CONV_SYSTEMS)}")
    return f"{CONV_SYSTEMS[conv_mode]} USER: <image>\n{question} ASSISTANT:"


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
        if self.tokenizer is None:
            raise DymuError("this model has no tokenizer: pass tokenizer=... to dymu.apply (or tokenize yourself "
                            "and call dymu.generation.prepare)")  # fmt: skip
        ids = self.family_impl.tokenize(self.tokenizer, prompt, self.parts)
        split_at_image(ids)  # exactly one <image>, followed by text
        return ids

    def pixel_values(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """The family's own preprocessing: llava-hf resizes/crops, liuhaotian pads to square first."""
        if self.image_processor is None:
            raise DymuError("this model has no image processor: pass image_processor=... to dymu.apply")
        return preprocess(images, self.image_processor, pad=self.parts.pad_image)

    def prepare(self, prompts: Sequence[str], images: Sequence[ImageInput]) -> PreparedBatch:
        """DyMU prefill of a batch (one image per prompt) into a cache, ready for `generate`."""
        return self._prepare(prompts, images, borrow=False)

    def _prepare(self, prompts: Sequence[str], images: Sequence[ImageInput], borrow: bool,
                 decode_tokens: int | None = None) -> PreparedBatch:  # fmt: skip
        ids = [self.tokenize(p) for p in prompts]
        pixels = self.pixel_values(images)
        return prepare(self.parts, ids, pixels, self.thresholds, self.vtu, self.options, borrow=borrow,
                       decode_tokens=decode_tokens)  # fmt: skip

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
        # decoded right here: no copy of the K/V needed, and the graph decode's buffer is the prefill's cache
        sink = sink_tokens(self.parts, self.options, kwargs, max_new_tokens)
        batch = self._prepare(prompts, images, borrow=True, decode_tokens=sink)
        out = generate_prepared(self.parts, batch, max_new_tokens, self.options, **kwargs)
        new = out.sequences[:, batch.virtual_ids.shape[1] :]
        stops = self.eos_ids(kwargs.get("eos_token_id"))
        answers = []
        for row, n_visual in zip(new.tolist(), batch.visual_tokens, strict=True):
            row = _through_first(row, stops)  # a batch pads finished rows; one prompt alone stops here
            text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
            answers.append(Answer(text, row, n_visual))
        return answers

    def eos_ids(self, given: Any = None) -> set[int]:
        """The ids that end an answer: the caller's, else the generation config's, else the tokenizer's."""
        found = given
        if found is None:
            found = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if found is None and self.tokenizer is not None:
            found = getattr(self.tokenizer, "eos_token_id", None)
        return id_set(found)


def _through_first(row: list[int], stops: set[int]) -> list[int]:
    """`row` up to and including its first stop id (the padding after it dropped)."""
    for i, token in enumerate(row):
        if token in stops:
            return row[: i + 1]
    return row


def _caused_by(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type `kind` in `err`'s cause/context chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _thresholds(thresholds: torch.Tensor | str | Path | None, parts: LlavaParts) -> torch.Tensor | None:
    layers = parts.vision.config.num_hidden_layers
    if thresholds is None:
        return None
    if isinstance(thresholds, (str, Path)):
        return load_thresholds(thresholds, num_layers=layers)
    if isinstance(thresholds, torch.Tensor):
        return validate_thresholds(thresholds, "thresholds", layers)
    try:
        tau = torch.tensor([float(v) for v in thresholds], dtype=torch.float64)
    except (TypeError, ValueError):
        raise DymuError("thresholds: expected a tensor, a file path or a list of numbers") from None
    return validate_thresholds(tau, "thresholds", layers)


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
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise DymuError(f"dymu.apply: expected a loaded LLaVA-1.5 model (torch module with a config), got "
                        f"{type(model).__name__}")  # fmt: skip
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
    path = Path(model_path)
    config = families.read_config(path)
    found = families.detect(path, config)
    chosen = found if family == "auto" else families.get(family)
    if chosen is not found:
        raise DymuError(f"{path}: config.json describes a {found.name} checkpoint, not {family}; "
                        f"pass --family auto (or {found.name})")  # fmt: skip
    check_weights(path)
    check_sizes(path, chosen.hidden_size(config))
    try:
        model, tokenizer, image_processor = chosen.load(path, dtype, device)
    except (pickle.UnpicklingError, OSError) as err:  # transformers wraps torch's refusal in an OSError
        refusal = _caused_by(err, pickle.UnpicklingError)
        if refusal is None:
            raise
        first = str(refusal).strip().splitlines()[0][:160] if str(refusal).strip() else "refused"
        raise DymuError(f"{path}: its .bin weights hold more than tensors and were not unpickled ({first}); "
                        "convert trusted weights with `dymu convert` or use safetensors") from None  # fmt: skip
    return _build(chosen, model, thresholds, vtu, tokenizer, image_processor, options)
