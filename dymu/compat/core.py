"""Fixes that concern torch and transformers themselves (no legacy package needed)."""

from __future__ import annotations

import inspect
import pathlib
import pickle
import tempfile
from typing import Any

import torch

from ..versions import installed, transformers_at_least
from . import disabled, register

# ---------------------------------------------------------------- helpers shared by checks


def tiny_llama(layers: int = 2, seed: int = 0):
    """A seeded 2-layer Llama decoder-only LM for self-contained checks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def cache_tensors(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer (keys, values) from any transformers cache flavour (Cache object or tuples)."""
    if hasattr(cache, "layers"):
        return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(cache.key_cache), list(cache.value_cache)
    return [kv[0] for kv in cache], [kv[1] for kv in cache]


def greedy_without_cache(model, input_ids: torch.Tensor, steps: int, logits_fn=None) -> torch.Tensor:
    """Reference greedy decoding that recomputes the whole sequence every step."""
    logits_fn = logits_fn or (lambda ids: model(input_ids=ids, use_cache=False).logits)
    ids = input_ids
    for _ in range(steps):
        with torch.no_grad():
            logits = logits_fn(ids)
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids[:, input_ids.shape[1] :]


# ---------------------------------------------------------------- scatter


def _verify_scatter() -> str:
    from ..scatter import group_mean

    gen = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 2, 2, 5, 0, 1, 5, 5, 2])
    for shape, dim in (((2, 9, 3, 4), 1), ((2, 3, 9, 4), 2)):
        src = torch.randn(shape, generator=gen, dtype=torch.float64)
        got = group_mean(src, index, 6, dim=dim)
        for g in range(6):
            members = (index == g).nonzero().flatten()
            want = src.index_select(dim, members).mean(dim) if len(members) else 0 * src.select(dim, 0)
            torch.testing.assert_close(got.select(dim, g), want)
    return "group_mean matches a per-group loop on (B,N,H,d) dim 1 and (B,H,N,d) dim 2"


def _negative_scatter() -> None:
    src = torch.randn(2, 9, 3, 4)
    torch.zeros(2, 6, 3, 4).scatter_add_(1, torch.tensor([0, 2, 2, 5, 0, 1, 5, 5, 2]), src)


register("scatter", verify=_verify_scatter, negative=_negative_scatter)

# ---------------------------------------------------------------- weights-only


class _Payload:
    """Pickles to a call that creates a marker file: proof that unpickling ran code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def safe_load(path, **kwargs: Any) -> Any:
    """`torch.load` that only ever reads tensors (and plain containers)."""
    kwargs.pop("weights_only", None)
    return torch.load(path, weights_only=True, **kwargs)


def _payload_file(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    marker = folder / "executed"
    path = folder / "payload.bin"
    torch.save({"w": torch.zeros(2), "evil": _Payload(marker)}, path)
    return path, marker


def _apply_weights_only() -> None:
    """Route the legacy builder's torch.load calls (projector / LoRA files) through safe_load."""
    if installed("llava-torch") is None:
        return
    import types

    from llava.model import builder

    if getattr(builder.torch, "_dymu_safe", False):
        return

    class _SafeTorch(types.ModuleType):
        _dymu_safe = True
        load = staticmethod(safe_load)

        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

    builder.torch = _SafeTorch("torch")


def _verify_weights_only() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path, marker = _payload_file(pathlib.Path(tmp))
        loaders = [safe_load]
        if installed("llava-torch") is not None:
            from llava.model import builder

            loaders.append(builder.torch.load)
        for load in loaders:
            try:
                load(path, map_location="cpu")
            except pickle.UnpicklingError:  # how torch's weights-only unpickler refuses objects
                pass
            else:
                raise AssertionError(f"{load} unpickled a non-tensor object")
            if marker.exists():
                raise AssertionError("the pickled payload ran")
    return f"{len(loaders)} loader(s) refuse pickled code"


def _negative_weights_only() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, marker = _payload_file(pathlib.Path(tmp))
        torch.load(path, map_location="cpu")  # the pre-2.6 default: weights_only=False
        if marker.exists():
            raise RuntimeError("payload executed: torch.load without weights_only=True ran pickled code")


register(
    "weights-only", verify=_verify_weights_only, negative=_negative_weights_only, apply=_apply_weights_only
)

# ---------------------------------------------------------------- safetensors


def _verify_safetensors() -> str:
    from safetensors.torch import load_file

    from ..checkpoints import bin_blocked, check_weights, convert_to_safetensors
    from ..errors import DymuError
    from ..tiny import ensure_tiny_checkpoints

    src = ensure_tiny_checkpoints()["llava-hf-tiny-bin"]
    with tempfile.TemporaryDirectory() as tmp:
        dst = convert_to_safetensors(src, pathlib.Path(tmp) / "converted")
        converted = load_file(str(dst / "model.safetensors"))
        original = safe_load(src / "pytorch_model.bin", map_location="cpu")
        if converted.keys() != original.keys() or any(
            not torch.equal(converted[k], original[k]) for k in original
        ):
            raise AssertionError("converted tensors differ from the .bin tensors")
        if check_weights(dst) != "safetensors":
            raise AssertionError("converted directory not recognised as safetensors")
    try:
        check_weights(src)
        refused = False
    except DymuError:
        refused = True
    if refused != bin_blocked():
        raise AssertionError(f".bin refusal {refused} but this stack blocks .bin: {bin_blocked()}")
    return (
        f"convert round-trips {len(original)} tensors; .bin {'refused with a fix' if refused else 'accepted'}"
    )


def _negative_safetensors() -> None:
    from transformers import LlavaForConditionalGeneration

    from ..tiny import ensure_tiny_checkpoints

    LlavaForConditionalGeneration.from_pretrained(str(ensure_tiny_checkpoints()["llava-hf-tiny-bin"]))


register("safetensors", verify=_verify_safetensors, negative=_negative_safetensors)

# ---------------------------------------------------------------- cache-format


def _tiny_hf_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14)  # fmt: skip
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=70, max_position_embeddings=128)  # fmt: skip
    return LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_index=69)
    ).eval()


def _prefilled_generate(model, force_cache_object: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import DynamicCache, GenerationMixin

    from ..generation import cache_kwarg, new_cache
    from ..llava import find_parts

    # text-only prefixes go through the inner decoder: Llava's own forward crashes on them in 4.47
    parts = find_parts(model)
    ids = torch.tensor([[1, 5, 9, 12, 3, 7, 22]])
    with torch.no_grad():
        prefix = parts.decoder(input_ids=ids[:, :-1], use_cache=True)
    keys, values = cache_tensors(prefix.past_key_values)
    if force_cache_object:
        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(keys, values, strict=True)):
            cache.update(k, v, i)
    else:
        cache = new_cache(model, keys, values)
    out = GenerationMixin.generate(model, input_ids=ids, **{cache_kwarg(): cache}, max_new_tokens=4,
                                   do_sample=False, pad_token_id=0)  # fmt: skip

    def logits(seq: torch.Tensor) -> torch.Tensor:
        return parts.lm_head(parts.decoder(input_ids=seq, use_cache=False).last_hidden_state)

    return out[:, ids.shape[1] :], greedy_without_cache(model, ids, 4, logits)


def _verify_cache_format() -> str:
    got, want = _prefilled_generate(_tiny_hf_llava(), force_cache_object=False)
    if not torch.equal(got, want):
        raise AssertionError(
            f"generate from a prefilled cache gave {got.tolist()}, recomputation {want.tolist()}"
        )
    return "generate from a prefilled cache equals greedy recomputation"


def _negative_cache_format() -> None:
    _prefilled_generate(_tiny_hf_llava(), force_cache_object=True)


register("cache-format", verify=_verify_cache_format, negative=_negative_cache_format)

# ---------------------------------------------------------------- causal-mask


def causal_mask(decoder, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past_key_values=None):
    """The decoder's own causal mask for a prefill, through whatever API this transformers has.

    Returns a boolean (B, 1, q, kv) "may attend" tensor. < 4.41: the era's
    `_prepare_4d_causal_attention_mask` helper; 4.41-4.52:
    `LlamaModel._update_causal_mask` (positional form of those versions); >= 4.53:
    `masking_utils.create_causal_mask`, called by keyword with the names this version uses
    (`input_embeds`/`inputs_embeds` from 5.2, `cache_position` until 5.9, `past_key_values`/
    `cache` from 5.24).
    """
    bsz, q = inputs_embeds.shape[:2]
    past = 0 if past_key_values is None else cache_tensors(past_key_values)[0][0].shape[-2]
    cache_position = torch.arange(past, past + q, device=inputs_embeds.device)
    if disabled("causal-mask"):  # what DyMU-style code written for 4.41-4.52 does on any version
        mask = decoder._update_causal_mask(
            attention_mask, inputs_embeds, cache_position, past_key_values, False
        )
    elif not transformers_at_least("4.41"):
        from transformers.modeling_attn_mask_utils import _prepare_4d_causal_attention_mask

        mask = _prepare_4d_causal_attention_mask(attention_mask, (bsz, q), inputs_embeds, past)
    elif not transformers_at_least("4.53"):
        mask = decoder._update_causal_mask(
            attention_mask, inputs_embeds, cache_position, past_key_values, False
        )
    else:
        from transformers.masking_utils import create_causal_mask

        params = inspect.signature(create_causal_mask).parameters
        kwargs: dict[str, Any] = {"config": decoder.config, "attention_mask": attention_mask}
        kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = inputs_embeds
        kwargs["cache" if "cache" in params else "past_key_values"] = past_key_values
        if "cache_position" in params:
            kwargs["cache_position"] = cache_position
        if "position_ids" in params:
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -q:]
        mask = create_causal_mask(**kwargs)
    kv = attention_mask.shape[1]
    reference = (
        torch.ones(q, kv, dtype=torch.bool, device=attention_mask.device).tril(kv - q)[None, None]
        & attention_mask.bool()[:, None, None]
    )
    if mask is None:  # the model would use plain causal attention (or build it itself)
        return reference
    if hasattr(mask, "to_dense"):  # flex BlockMask
        mask = mask.to_dense()
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(bsz, 1, q, kv)


def _verify_causal_mask() -> str:
    decoder = tiny_llama().model
    mask2d = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    embeds = torch.randn(2, 6, 32)
    got = causal_mask(decoder, embeds, mask2d)
    want = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] & mask2d.bool()[:, None, None]
    rows = mask2d.bool()  # padded query rows are left to each version's own convention
    for b in range(2):
        if not torch.equal(got[b, 0][rows[b]], want[b, 0][rows[b]]):
            raise AssertionError(f"row {b}: mask from transformers differs from causal + key padding")
    return "version's causal mask equals causal + key padding on a left-padded batch"


def _negative_causal_mask() -> None:
    decoder = tiny_llama().model
    embeds = torch.randn(1, 4, 32)
    decoder._update_causal_mask(torch.ones(1, 4), embeds, torch.arange(4), None, False)


register("causal-mask", verify=_verify_causal_mask, negative=_negative_causal_mask)
