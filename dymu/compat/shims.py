"""Runtime shims for torch and transformers: every branch on an installed version lives here,
each taking the path its fix's registration (`patches/fixes.toml`) selects. Checks for each
fix (verify and negative control) are in `checks.py`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache

try:  # transformers >= 4.38
    from transformers import StaticCache
except ImportError:  # pragma: no cover - the reference cell
    StaticCache = None

from ..errors import DymuError
from .registry import active, needed

# imports that exist only in some releases, taken where the fix that uses them is needed
if needed("causal-mask"):
    from transformers.masking_utils import create_causal_mask
if needed("mask-helper"):
    from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask

# ---------------------------------------------------------------- dtype-kwarg


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """`from_pretrained`'s dtype keyword for this transformers."""
    return {"torch_dtype": dtype} if active("dtype-kwarg") else {"dtype": dtype}


# ---------------------------------------------------------------- image-tokens


def image_tokens_per_image(patches: int) -> int:
    """How many `<image>` tokens stock `LlavaForConditionalGeneration` expects per image."""
    return 1 if active("image-tokens") else patches


# ---------------------------------------------------------------- rope-parameters


def rope_theta(config: Any) -> float:
    """The RoPE base of a Llama config; refuses scaled RoPE, which VTU does not implement."""
    if active("rope-parameters"):
        params = getattr(config, "rope_parameters", None) or {}
        kind, theta = params.get("rope_type", "default"), params.get("rope_theta", 10000.0)
    else:
        scaling = getattr(config, "rope_scaling", None) or {}
        kind, theta = scaling.get("rope_type", scaling.get("type", "default")), config.rope_theta
    if kind not in (None, "default"):
        raise DymuError(f"rope scaling type {kind!r} is not supported by dymu's VTU (LLaVA-1.5 uses none)")
    return float(theta)


# ---------------------------------------------------------------- cache-format, cache-layers, cache-keyword


def new_cache(model: torch.nn.Module, keys: list[torch.Tensor], values: list[torch.Tensor]) -> Any:
    """The cache `model.generate` takes here, holding per-layer (B, H_kv, N, d) tensors: tuples
    for `LlavaForConditionalGeneration` before 4.38, else a `DynamicCache`."""
    if active("cache-format") and not getattr(model, "_supports_cache_class", True):
        return tuple(zip(keys, values, strict=True))
    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.update(k, v, layer)
    return cache


class SinkCache(DynamicCache):
    """An empty cache for one prefill forward that copies each layer's keys and values into given
    buffers (layers, B, H_kv, L, hd) at positions 0..n-1 as the layer hands them over, and returns
    them unchanged: what a dynamic cache holding nothing yet returns too, so attention is the stock
    computation, but nothing accumulates (the prefill's peak holds one layer's keys, not all).
    `Cache.update(keys, values, layer_idx, ...)` is how every decoder of the Cache era (4.36 on)
    hands them over; `written` is the layers that did, for the caller to check."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.sink_keys, self.sink_values = keys, values
        self.written: set[int] = set()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        # the rest is `cache_kwargs` before 5.x and `kwargs=` after: nothing this cache needs
        if layer_idx in self.written:
            raise DymuError("a SinkCache takes one prefill forward; make a new one for the next")
        n = key_states.shape[-2]
        self.sink_keys[layer_idx, :, :, :n].copy_(key_states)
        self.sink_values[layer_idx, :, :, :n].copy_(value_states)
        self.written.add(layer_idx)
        return key_states, value_states


def cache_tensors(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer (keys, values) of any cache this transformers hands out."""
    if isinstance(cache, (tuple, list)):  # the tuple caches of the cache-format era
        return [kv[0] for kv in cache], [kv[1] for kv in cache]
    if active("cache-layers"):
        return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
    return list(cache.key_cache), list(cache.value_cache)


def cache_length(cache: Any) -> int:
    """Tokens held by a cache."""
    return int(cache_tensors(cache)[0][0].shape[-2])


def static_cache_supported(model: torch.nn.Module) -> str | None:
    """None when `model` can decode from a static cache here, else why not."""
    if StaticCache is None or (active("cache-format") and not getattr(model, "_supports_cache_class", True)):
        return "this transformers has no StaticCache for this model (< 4.38)"
    return None


def static_cache(config: Any, keys: list[torch.Tensor], values: list[torch.Tensor], max_len: int,
                 valid: torch.Tensor | None = None, reuse: Any = None) -> Any:  # fmt: skip
    """A `StaticCache` of `max_len` positions holding the given per-layer (B, H_kv, N, d) tensors at
    positions 0..N-1 (the static-cache fix picks the constructor this transformers has). `reuse`: a
    cache this function made before for the same batch size, length, dtype and device; it is reset
    and refilled, so its tensors keep their addresses (what a captured decode step needs).

    `valid` (B, N) marks real positions: padded ones get keys of 1 (they are masked out anyway),
    because some releases count a static cache's length from the non-zero keys of row 0, and a
    left-padded row's padding keys can be exactly zero."""
    bsz, _, n, _ = keys[0].shape
    if valid is not None and not bool(valid.all()):
        pad = ~valid.bool()[:, None, :, None]
        keys = [k.masked_fill(pad, 1.0) for k in keys]
    if reuse is not None:
        cache = reuse
        cache.reset()
    elif active("static-cache"):
        cache = StaticCache(config=config, max_batch_size=bsz, max_cache_len=max_len, device=keys[0].device,
                            dtype=keys[0].dtype)  # fmt: skip
    else:
        cache = StaticCache(config=config, max_cache_len=max_len)
    position = torch.arange(n, device=keys[0].device)
    for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.update(k, v, layer, {"cache_position": position})
    return cache


def cache_keyword() -> str:
    """The generate / forward keyword that carries the cache."""
    return "cache" if active("cache-keyword") else "past_key_values"


# ---------------------------------------------------------------- causal-mask, mask-helper


def causal_mask(decoder: Any, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                past_key_values: Any = None) -> torch.Tensor:  # fmt: skip
    """The decoder's own causal + padding mask for a prefill, as a boolean (B, 1, q, kv) "may
    attend" tensor, through this transformers' masking API: `create_causal_mask` by keyword
    (causal-mask; its keyword names are read from its signature), the era's helper
    (mask-helper), else `LlamaModel._update_causal_mask` (4.41-4.52)."""
    bsz, q = inputs_embeds.shape[:2]
    past = 0 if past_key_values is None else cache_length(past_key_values)
    cache_position = torch.arange(past, past + q, device=inputs_embeds.device)
    if active("causal-mask"):
        params = inspect.signature(create_causal_mask).parameters
        kwargs: dict[str, Any] = {"config": decoder.config, "attention_mask": attention_mask}
        kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = inputs_embeds
        kwargs["cache" if "cache" in params else "past_key_values"] = past_key_values
        if "cache_position" in params:
            kwargs["cache_position"] = cache_position
        if "position_ids" in params:
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -q:]
        mask = create_causal_mask(**kwargs)
    elif active("mask-helper"):
        mask = _prepare_4d_causal_attention_mask(attention_mask, (bsz, q), inputs_embeds, past)
    else:
        mask = decoder._update_causal_mask(
            attention_mask, inputs_embeds, cache_position, past_key_values, False
        )
    kv = attention_mask.shape[1]
    if mask is None:  # the model would use plain causal attention (or build it itself)
        return (
            torch.ones(q, kv, dtype=torch.bool, device=attention_mask.device).tril(kv - q)[None, None]
            & attention_mask.bool()[:, None, None]
        )
    if hasattr(mask, "to_dense"):  # flex BlockMask
        mask = mask.to_dense()
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(bsz, 1, q, kv)


# ---------------------------------------------------------------- weights-only, safetensors


def safe_load(path: Any, **kwargs: Any) -> Any:
    """`torch.load` that only ever reads tensors and plain containers."""
    kwargs.pop("weights_only", None)
    return torch.load(path, weights_only=True, **kwargs)


def bin_blocked() -> bool:
    """True where transformers refuses `.bin` weights (>= 4.52 on torch < 2.6): dymu then refuses
    them up front and names `dymu convert` (the safetensors fix)."""
    return active("safetensors")
