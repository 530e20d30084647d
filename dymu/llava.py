"""The parts of a loaded LLaVA-1.5 model that DyMU wires into, for either family.

- "hf": transformers' `LlavaForConditionalGeneration` (llava-hf checkpoints); its module
  tree moved in 4.52 (`model.model.language_model`) and again in 5.x (CLIP flattened);
- "legacy": the `llava` package's `LlavaLlamaForCausalLM` (liuhaotian checkpoints).

Parts are found by type and stable attribute names, not by version-specific paths.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import DymuError

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


def _first(model: nn.Module, kind: type, what: str) -> nn.Module:
    for module in model.modules():
        if isinstance(module, kind):
            return module
    raise DymuError(f"{type(model).__name__} has no {what}; is this a LLaVA-1.5 model?")


def _named(model: nn.Module, suffixes: tuple[str, ...], what: str) -> nn.Module:
    for name, module in model.named_modules():
        if name.split(".")[-1] in suffixes:
            return module
    raise DymuError(f"{type(model).__name__} has no {what} ({' / '.join(suffixes)})")


def find_parts(model: nn.Module) -> LlavaParts:
    """Locate tower, projector, decoder and head of a loaded LLaVA-1.5 model of either family."""
    from transformers import CLIPVisionModel, LlamaModel

    config = model.config
    legacy = getattr(config, "model_type", "") == "llava_llama" or hasattr(config, "mm_vision_tower")
    vision = _first(model, CLIPVisionModel, "CLIP vision tower")
    decoder = _first(model, LlamaModel, "Llama decoder")
    lm_head = model.get_output_embeddings()
    if legacy:
        projector = _named(model, ("mm_projector",), "multimodal projector")
        feature_layer = int(getattr(config, "mm_vision_select_layer", -2))
        select = getattr(config, "mm_vision_select_feature", "patch")
        image_token_id = 0
        pad_image = getattr(config, "image_aspect_ratio", "square") == "pad"
    else:
        projector = _named(model, ("multi_modal_projector",), "multimodal projector")
        feature_layer = int(getattr(config, "vision_feature_layer", -2))
        select = (
            "patch" if getattr(config, "vision_feature_select_strategy", "default") == "default" else "full"
        )
        image_token_id = int(getattr(config, "image_token_index", None) or config.image_token_id)
        pad_image = False  # llava-hf's processor resizes and centre-crops; it does not pad
    if select != "patch":
        raise DymuError(
            f"vision feature selection {select!r} keeps CLS; DyMU supports LLaVA-1.5's patch features"
        )
    return LlavaParts(
        family="legacy" if legacy else "hf",
        model=model,
        vision=vision,
        projector=projector,
        decoder=decoder,
        lm_head=lm_head,
        feature_layer=feature_layer,
        image_token_id=image_token_id,
        pad_image=pad_image,
    )
