"""DyMU-LLaVA prefill and generation, for either family (DYMU_SPEC.md section 3).

Prefill: the DToMe tower merges the image, the projector maps the merged features, and
fast VTU runs the decoder on the merged sequence while attending at the virtual length
(text + 576 image positions). The resulting post-RoPE keys/values fill a real
transformers cache of the installed version. The final prompt token (always text) is
left to the model's own `generate`, which attends over that cache exactly as VTU would
for a singleton group, then decodes normally. So no generate internals are touched.

Batches are left-padded (the virtual sequence and the merged one), with positions
`cumsum(mask) - 1` as transformers' generate derives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import DymuError
from .llava import IMAGE, LlavaParts
from .tower import TowerOutput, encode_images
from .vtu import vtu_prefill

VTU_MODES = ("fast", "none")


@dataclass
class PreparedBatch:
    """Everything generate needs after a DyMU prefill of all but the last prompt token."""

    cache: Any
    virtual_ids: torch.Tensor  # (B, N) left-padded; image positions hold parts.image_token_id
    attention_mask: torch.Tensor  # (B, N)
    visual_tokens: list[int]  # merged visual tokens per sample (what the LLM's row-wise layers see)
    tower: TowerOutput


def _split(ids: list[int]) -> tuple[list[int], list[int]]:
    if ids.count(IMAGE) != 1:
        raise DymuError(f"a prompt needs exactly one <image> placeholder, found {ids.count(IMAGE)}")
    k = ids.index(IMAGE)
    before, after = ids[:k], ids[k + 1 :]
    if not after:
        raise DymuError("the prompt must end with text after <image> (e.g. '... ASSISTANT:')")
    return before, after


def new_cache(model: torch.nn.Module, keys: list[torch.Tensor], values: list[torch.Tensor]) -> Any:
    """The installed transformers' cache for `model`, holding per-layer (B, H_kv, N, d) tensors.

    A `DynamicCache` where the model takes Cache objects; the legacy tuple-of-tuples where it
    does not (e.g. `LlavaForConditionalGeneration` before transformers 4.38, whose
    `_supports_cache_class` is False). Remove the tuple branch when 4.37 leaves the matrix.
    """
    if not getattr(model, "_supports_cache_class", True):
        return tuple(zip(keys, values, strict=True))
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.update(k, v, layer)
    return cache


def cache_length(cache: Any) -> int:
    """Tokens held by a cache of either flavour."""
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])


@torch.no_grad()
def prepare(
    parts: LlavaParts,
    prompt_ids: list[list[int]],
    pixel_values: torch.Tensor,
    thresholds: torch.Tensor | None,
    vtu: str = "fast",
) -> PreparedBatch:
    """Run the DyMU prefill for a batch of prompts (one image each) and fill the cache."""
    if vtu not in VTU_MODES:
        raise DymuError(f"vtu={vtu!r} is not one of {', '.join(VTU_MODES)}")
    if len(prompt_ids) != pixel_values.shape[0]:
        raise DymuError(f"{len(prompt_ids)} prompts but {pixel_values.shape[0]} images")
    device = parts.decoder.embed_tokens.weight.device
    dtype = parts.decoder.embed_tokens.weight.dtype
    vision_dtype = next(parts.vision.parameters()).dtype
    tower = encode_images(
        parts.vision, pixel_values.to(device, vision_dtype), thresholds, parts.feature_layer
    )
    projected = parts.projector(tower.padded.to(dtype))
    patches = tower.mapping[0].numel()

    merged_rows, idx_rows, virtual_ids = [], [], []
    for i, ids in enumerate(prompt_ids):
        before, after = _split(ids)
        n_m = int(tower.num_tokens[i])
        image_idx = tower.mapping[i].to(device) if vtu == "fast" else torch.arange(n_m, device=device)
        text = torch.tensor(before + after, device=device)
        embeds = parts.decoder.embed_tokens(text)
        k = len(before)
        merged_rows.append(torch.cat([embeds[:k], projected[i, :n_m], embeds[k:]]))
        idx_rows.append(
            torch.cat(
                [
                    torch.arange(k, device=device),
                    k + image_idx,
                    k + n_m + torch.arange(len(after), device=device),
                ]
            )
        )
        n_image = patches if vtu == "fast" else n_m
        virtual_ids.append(before + [parts.image_token_id] * n_image + after)

    bsz = len(prompt_ids)
    width_u = max(len(r) for r in merged_rows)  # merged rows minus the last token, plus a dump row
    width_v = max(len(v) for v in virtual_ids)
    merged = torch.zeros(bsz, width_u, merged_rows[0].shape[-1], dtype=dtype, device=device)
    idx = torch.zeros(bsz, width_v - 1, dtype=torch.long, device=device)  # padded positions -> dump row 0
    mask = torch.zeros(bsz, width_v, dtype=torch.long, device=device)
    ids_out = torch.full((bsz, width_v), parts.image_token_id, dtype=torch.long, device=device)
    for b in range(bsz):
        rows, n_u, n_v = merged_rows[b][:-1], len(merged_rows[b]) - 1, len(virtual_ids[b])
        start_u = width_u - n_u
        merged[b, start_u:] = rows
        idx[b, width_v - n_v :] = start_u + idx_rows[b][:-1]
        mask[b, width_v - n_v :] = 1
        ids_out[b, width_v - n_v :] = torch.tensor(virtual_ids[b], device=device)
    valid = mask[:, :-1].bool()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, :-1]
    out = vtu_prefill(parts.decoder, merged, idx, positions, None if bool(valid.all()) else valid)
    visual = [int(n) for n in tower.num_tokens]
    return PreparedBatch(new_cache(parts.model, out.keys, out.values), ids_out, mask, visual, tower)


def cache_kwarg() -> str:
    """The generate/forward keyword for the cache: `cache` from transformers 5.24, else `past_key_values`."""
    from .versions import transformers_at_least

    return "cache" if transformers_at_least("5.24") else "past_key_values"


@torch.no_grad()
def generate_prepared(parts: LlavaParts, batch: PreparedBatch, max_new_tokens: int, **kwargs: Any):
    """Greedy decode (fixed length) from a prepared batch with the model's own generate."""
    from transformers import GenerationMixin

    eos = kwargs.pop("eos_token_id", None)
    gen_kwargs = {
        "input_ids": batch.virtual_ids,
        "attention_mask": batch.attention_mask,
        cache_kwarg(): batch.cache,
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "return_dict_in_generate": True,
        "output_scores": True,
        "pad_token_id": kwargs.pop("pad_token_id", 0),
        **kwargs,
    }
    if eos is not None:
        gen_kwargs["eos_token_id"] = eos
    # GenerationMixin.generate directly: the legacy package overrides `generate` to re-embed images
    return GenerationMixin.generate(parts.model, **gen_kwargs)
