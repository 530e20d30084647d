"""Model builders: the one set of seeded, random-weight models the checks, the benchmark and
the tests build (nothing is downloaded). Random weights: timings and plumbing only.

- tiny ones (CPU, milliseconds) for the fix checks: a Llama LM, an HF Llava, a legacy Llava;
- `random_llava` / `random_clip`: the LLaVA-1.5-7B / CLIP-L/336 architecture ("full") or
  the same depth and token count at a CPU-friendly width ("small"), built on the device;
- `clip_processor`: OpenAI CLIP preprocessing at any size.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from ..images import CLIP_MEAN, CLIP_STD

TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 128}  # fmt: skip
# CLIP ViT-L/14-336 as LLaVA-1.5 uses it ("full"); "small" keeps depth and token count at a width a
# 2-core CPU can time
CLIP_GEOMETRIES = {
    "small": {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4},
    "full": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16},
}
LLAMA_SIZES = {  # Llama-2-7B / Vicuna-7B as in LLaVA-1.5-7B
    "full": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4},
}


def tiny_llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A seeded decoder-only Llama LM (hidden 32) for self-contained checks."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_TEXT, "num_hidden_layers": layers}, vocab_size=64)).eval()


def tiny_hf_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    """A seeded `LlavaForConditionalGeneration` with a 2-layer CLIP (4 patches) and Llama."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14)  # fmt: skip
    text = LlamaConfig(**TINY_TEXT, vocab_size=70)
    return LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=69)
    ).eval()


def tiny_legacy_llava(seed: int = 0) -> torch.nn.Module:
    """A seeded legacy `LlavaLlamaForCausalLM` (no vision tower) from the legacy package."""
    from llava.model.language_model.llava_llama import LlavaConfig as LegacyConfig  # noqa: PLC0415 - optional dependency
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM  # noqa: PLC0415 - optional dependency

    torch.manual_seed(seed)
    return LlavaLlamaForCausalLM(LegacyConfig(**TINY_TEXT, vocab_size=64)).eval()


def clip_from_config(image_size: int, layers: int, hidden: int, heads: int, seed: int = 0,
                     intermediate: int | None = None) -> CLIPVisionModel:  # fmt: skip
    """A seeded CLIP vision tower (patch 14, quick_gelu) in eval mode, float32."""
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate or hidden * 2, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=14, hidden_act="quick_gelu")  # fmt: skip
    return CLIPVisionModel(cfg).eval()


def random_clip(
    geometry: str, device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> CLIPVisionModel:
    """A random-weight CLIP tower with 336-px / patch-14 / 24-layer geometry, built on `device`."""
    cfg = CLIPVisionConfig(image_size=336, patch_size=14, num_hidden_layers=24, hidden_act="quick_gelu",
                           **CLIP_GEOMETRIES[geometry])  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = CLIPVisionModel(cfg)
    return model.to(dtype).eval()


def random_llava(
    size: str, device: torch.device | str, dtype: torch.dtype, seed: int = 0, image_token_index: int = 32000
) -> LlavaForConditionalGeneration:
    """A random-weight LLaVA-1.5 (`LlavaForConditionalGeneration`) built directly on `device`;
    `image_token_index` lets a smaller tokenizer's `<image>` id stand in for llava-hf's 32000."""
    vision = CLIPVisionConfig(image_size=336, patch_size=14, num_hidden_layers=24, hidden_act="quick_gelu",
                              **CLIP_GEOMETRIES["full" if size == "full" else "small"])  # fmt: skip
    text = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, **LLAMA_SIZES[size])
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_index,
                      projector_hidden_act="gelu", vision_feature_layer=-2)  # fmt: skip
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.to(device, dtype).eval()


def clip_processor(size: int) -> Any:
    """A CLIPImageProcessor with OpenAI CLIP normalisation at `size` px (no download)."""
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              image_mean=CLIP_MEAN, image_std=CLIP_STD)  # fmt: skip
