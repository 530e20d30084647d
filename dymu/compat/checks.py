"""The check of every fix: a `verify()` that can fail (run after the fix's apply()) and a
negative control that runs the unfixed path and must fail with the fix's documented error
(`patches/fixes.toml` `error`) wherever the fix is needed. Top floor: the checks build
models from `dymu.testing` and load the tiny checkpoints through the real loaders.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import pickle
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    DynamicCache,
    GenerationMixin,
    LlamaConfig,
    LlavaForConditionalGeneration,
)

from ..checkpoints import check_weights, convert_to_safetensors
from ..errors import DymuError
from ..families import FAMILIES
from ..families.hf import stock_inputs
from ..scatter import group_mean
from ..testing.builders import tiny_hf_llava, tiny_legacy_llava, tiny_llama
from ..testing.tiny import ensure_tiny_checkpoints, nobos_variant
from ..versions import installed
from . import legacy, shims
from .registry import Fix, active, disabled, fixes

LEGACY = ("llava-torch",)


@dataclass(frozen=True)
class Check:
    verify: Callable[[], str]
    negative: Callable[[], None] | None
    requires: tuple[str, ...] = ()


def greedy_without_cache(model, input_ids: torch.Tensor, steps: int, logits_fn=None) -> torch.Tensor:
    """Reference greedy decoding that recomputes the whole sequence every step."""
    logits_fn = logits_fn or (lambda ids: model(input_ids=ids, use_cache=False).logits)
    ids = input_ids
    for _ in range(steps):
        with torch.no_grad():
            logits = logits_fn(ids)
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids[:, input_ids.shape[1] :]


def _tiny(name: str) -> pathlib.Path:
    return ensure_tiny_checkpoints()[name]


# ---------------------------------------------------------------- scatter


def _verify_scatter() -> str:
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


# ---------------------------------------------------------------- weights-only


class _Payload:
    """Pickles to a call that creates a marker file: proof that unpickling ran code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _payload_file(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    marker = folder / "executed"
    path = folder / "payload.bin"
    torch.save({"w": torch.zeros(2), "evil": _Payload(marker)}, path)
    return path, marker


def _verify_weights_only() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path, marker = _payload_file(pathlib.Path(tmp))
        loaders = [shims.safe_load]
        if installed("llava-torch") is not None:
            from llava.model import builder  # noqa: PLC0415 - optional dependency

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


# ---------------------------------------------------------------- safetensors


def _verify_safetensors() -> str:
    src = _tiny("llava-hf-tiny-bin")
    with tempfile.TemporaryDirectory() as tmp:
        dst = convert_to_safetensors(src, pathlib.Path(tmp) / "converted")
        converted = load_file(str(dst / "model.safetensors"))
        original = shims.safe_load(src / "pytorch_model.bin", map_location="cpu")
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
    if refused != shims.bin_blocked():
        raise AssertionError(f".bin refusal {refused} but this stack blocks .bin: {shims.bin_blocked()}")
    return (
        f"convert round-trips {len(original)} tensors; .bin {'refused with a fix' if refused else 'accepted'}"
    )


def _negative_safetensors() -> None:
    LlavaForConditionalGeneration.from_pretrained(str(_tiny("llava-hf-tiny-bin")))


# ---------------------------------------------------------------- cache-format, cache-layers, cache-keyword

PROMPT_IDS = [[1, 5, 9, 12, 3, 7, 22]]


def _prefilled_generate(model, make_cache: Callable[[list, list], Any], keyword: str | None = None):
    """(generate from a cache of all but the last prompt token, greedy recomputation)."""
    parts = FAMILIES["hf"].parts(model)
    ids = torch.tensor(PROMPT_IDS)
    with (
        torch.no_grad()
    ):  # text-only prefixes through the inner decoder: Llava's forward crashes on them in 4.47
        prefix = parts.decoder(input_ids=ids[:, :-1], use_cache=True)
    keys, values = shims.cache_tensors(prefix.past_key_values)
    out = GenerationMixin.generate(model, input_ids=ids, **{keyword or shims.cache_keyword(): make_cache(keys, values)},
                                   max_new_tokens=4, do_sample=False, pad_token_id=0)  # fmt: skip

    def logits(seq: torch.Tensor) -> torch.Tensor:
        return parts.lm_head(parts.decoder(input_ids=seq, use_cache=False).last_hidden_state)

    return out[:, ids.shape[1] :], greedy_without_cache(model, ids, 4, logits)


def _verify_cache_generate() -> str:
    model = tiny_hf_llava()
    got, want = _prefilled_generate(model, lambda k, v: shims.new_cache(model, k, v))
    if not torch.equal(got, want):
        raise AssertionError(
            f"generate from a prefilled cache gave {got.tolist()}, recomputation {want.tolist()}"
        )
    return f"generate(`{shims.cache_keyword()}`=prefilled cache) equals greedy recomputation"


def _dynamic_cache(keys: list, values: list) -> DynamicCache:
    cache = DynamicCache()
    for i, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.update(k, v, i)
    return cache


def _negative_cache_format() -> None:
    _prefilled_generate(tiny_hf_llava(), _dynamic_cache)


def _verify_cache_layers() -> str:
    keys = [torch.randn(1, 2, 5, 4) for _ in range(3)]
    values = [torch.randn(1, 2, 5, 4) for _ in range(3)]
    got_k, got_v = shims.cache_tensors(_dynamic_cache(keys, values))
    if len(got_k) != 3 or not all(
        torch.equal(a, b) for a, b in zip(got_k + got_v, keys + values, strict=True)
    ):
        raise AssertionError("cache tensors read back differ from those written")
    return "per-layer keys/values read back from a DynamicCache equal those written"


def _negative_cache_layers() -> None:
    _dynamic_cache([torch.zeros(1, 1, 1, 2)], [torch.zeros(1, 1, 1, 2)]).key_cache  # noqa: B018 - the access is the check


def _negative_cache_keyword() -> None:
    model = tiny_hf_llava()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # code written for < 5.24 meets a deprecation (removal in 6.0)
        _prefilled_generate(model, lambda k, v: shims.new_cache(model, k, v), keyword="past_key_values")


# ---------------------------------------------------------------- static-cache


def _verify_static_cache() -> str:
    model = tiny_hf_llava()
    why = shims.static_cache_supported(model)
    if why:
        return f"static decode unavailable here ({why}); decode stays dynamic"
    dynamic, _ = _prefilled_generate(model, lambda k, v: shims.new_cache(model, k, v))
    static, want = _prefilled_generate(
        model, lambda k, v: shims.static_cache(model.config.get_text_config(), k, v, 16)
    )
    if not (torch.equal(static, dynamic) and torch.equal(static, want)):
        raise AssertionError(
            f"static decode {static.tolist()} != dynamic {dynamic.tolist()} / recomputed {want.tolist()}"
        )
    return "generate from a prefilled StaticCache equals the dynamic cache and greedy recomputation"


def _negative_static_cache() -> None:
    shims.StaticCache(config=tiny_llama().config, max_cache_len=16)  # the >= 4.56 constructor


# ---------------------------------------------------------------- causal-mask, mask-helper


def _verify_causal_mask() -> str:
    decoder = tiny_llama().model
    mask2d = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    got = shims.causal_mask(decoder, torch.randn(2, 6, 32), mask2d)
    want = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] & mask2d.bool()[:, None, None]
    rows = mask2d.bool()  # padded query rows are left to each version's own convention
    for b in range(2):
        if not torch.equal(got[b, 0][rows[b]], want[b, 0][rows[b]]):
            raise AssertionError(f"row {b}: mask from transformers differs from causal + key padding")
    return "the version's causal mask equals causal + key padding on a left-padded batch"


def _negative_causal_mask() -> None:
    decoder = tiny_llama().model
    decoder._update_causal_mask(torch.ones(1, 4), torch.randn(1, 4, 32), torch.arange(4), None, False)


# ---------------------------------------------------------------- dtype-kwarg


def _load_tiny_hf(**kwargs: Any) -> torch.nn.Module:
    return LlavaForConditionalGeneration.from_pretrained(str(_tiny("llava-hf-tiny-safetensors")), **kwargs)


def _verify_dtype_kwarg() -> str:
    model = _load_tiny_hf(**shims.dtype_kwargs(torch.float16))
    if next(model.parameters()).dtype != torch.float16:
        raise AssertionError(f"asked for float16, loaded {next(model.parameters()).dtype}")
    return f"from_pretrained({next(iter(shims.dtype_kwargs(torch.float16)))}=float16) loads float16"


def _negative_dtype_kwarg() -> None:
    model = _load_tiny_hf(dtype=torch.float16)
    if next(model.parameters()).dtype != torch.float16:
        raise RuntimeError("dtype ignored: `dtype=` did not reach the weights")


# ---------------------------------------------------------------- image-tokens


def _stock_logits(per_image: int | None) -> torch.Tensor:
    model = tiny_hf_llava()
    parts = FAMILIES["hf"].parts(model)
    inputs = stock_inputs(
        parts, [[1, 5, -200, 7, 9]], torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    )
    if per_image is not None:  # what code that ignores this transformers' convention would send
        ids = [1, 5, *[parts.image_token_id] * per_image, 7, 9]
        inputs["input_ids"] = torch.tensor([ids])
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        return model(**inputs).logits


def _verify_image_tokens() -> str:
    logits = _stock_logits(None)
    patches = 4
    want = 4 + patches  # four text tokens plus the image's features
    if logits.shape[1] != want:
        raise AssertionError(f"stock Llava saw {logits.shape[1]} positions, expected {want}")
    return f"stock Llava takes {shims.image_tokens_per_image(patches)} <image> token(s) per image here"


def _negative_image_tokens() -> None:
    _stock_logits(4)  # one token per feature, the >= 4.47 convention


# ---------------------------------------------------------------- rope-parameters


def _verify_rope_parameters() -> str:
    config = LlamaConfig(**{"rope_theta": 12345.0})
    if shims.rope_theta(config) != 12345.0:
        raise AssertionError(f"read RoPE base {shims.rope_theta(config)}, configured 12345.0")
    return "the configured RoPE base (12345) is read back"


def _negative_rope_parameters() -> None:
    LlamaConfig(**{"rope_theta": 12345.0}).rope_theta  # noqa: B018 - the 4.x attribute


# ---------------------------------------------------------------- generate-kwargs, cache-rename (legacy)


def _legacy_generate(model) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    out = GenerationMixin.generate(model, input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1] :], greedy_without_cache(model, ids, 5)


def _verify_legacy_generate() -> str:
    got, want = _legacy_generate(tiny_legacy_llava())
    if not torch.equal(got, want):  # a swallowed cache decodes from the last token alone
        raise AssertionError(f"cached generate {got.tolist()} != recomputed greedy {want.tolist()}")
    return "legacy generate with the cache equals greedy recomputation"


def _negative_legacy_generate() -> None:
    cls = legacy.legacy_class()
    patched = cls.forward
    cls.forward = getattr(patched, "_dymu_original", patched)
    try:
        _legacy_generate(tiny_legacy_llava())
    finally:
        cls.forward = patched


# ---------------------------------------------------------------- loader-kwargs, builder-dtype (legacy)


def _verify_loader_kwargs() -> str:
    kw = legacy.translate_loader_kwargs(
        {"torch_dtype": torch.float16, "load_in_8bit": False, "device_map": {"": "cpu"}}
    )
    key = next(iter(shims.dtype_kwargs(torch.float16)))
    if kw.get(key) is not torch.float16:
        raise AssertionError(f"dtype not passed as {key}: {kw}")
    if active("loader-kwargs") and "load_in_8bit" in kw:
        raise AssertionError("load_in_8bit still passed to a transformers that refuses it")
    model = legacy.legacy_class().from_pretrained(
        str(_tiny("llava-v1.5-tiny-safetensors")), torch_dtype=torch.float16
    )
    if next(model.parameters()).dtype != torch.float16:
        raise AssertionError("the builder's dtype request was lost")
    return f"builder kwargs load the tiny legacy model (dtype via `{key}`)"


def _negative_loader_kwargs() -> None:
    cls = legacy.legacy_class()
    super(cls, cls).from_pretrained(str(_tiny("llava-v1.5-tiny-safetensors")), load_in_8bit=True)


def _builder_weights(use_fix: bool) -> torch.Tensor:
    from llava.model.builder import load_pretrained_model  # noqa: PLC0415 - optional dependency

    path = _tiny("llava-v1.5-tiny-safetensors")
    context = (legacy.builder_dtype(legacy.legacy_class(), torch.float32) if use_fix
               else contextlib.nullcontext())  # fmt: skip
    with legacy.patches_restored(), context:
        legacy.apply_patch_set()  # the builder's other kwargs must load on this transformers
        _, model, _, _ = load_pretrained_model(str(path), None, "llava-v1.5", device_map="cpu", device="cpu")
    stored = load_file(str(path / "model.safetensors"))["model.embed_tokens.weight"]
    got = model.get_input_embeddings().weight.detach().float()
    if not torch.equal(got, stored):
        raise RuntimeError(f"weights rounded: loaded embeddings differ from the stored float32 ones "
                           f"(max {float((got - stored).abs().max()):.2e})")  # fmt: skip
    return got


def _verify_builder_dtype() -> str:
    _builder_weights(use_fix=True)
    return "the legacy builder loads the stored float32 weights bit for bit"


def _negative_builder_dtype() -> None:
    _builder_weights(use_fix=False)


# ---------------------------------------------------------------- tokenizer (legacy)

PROMPT = "A chat between a curious human and an artificial intelligence assistant. USER: What is in the picture? ASSISTANT:"


def expected_prompt_ids() -> list[int]:
    """Ids of PROMPT under the tiny sentencepiece model, recorded once from sentencepiece itself."""
    data = resources.files("dymu").joinpath("data/tiny_prompt_ids.json").read_text(encoding="utf-8")
    return json.loads(data)["ids"]


def _verify_tokenizer() -> str:
    tok = legacy.legacy_tokenizer(_tiny("llava-v1.5-tiny-safetensors"))
    got = tok(PROMPT).input_ids
    if got != expected_prompt_ids():
        raise AssertionError(f"prompt ids differ: {got[:12]}... vs {expected_prompt_ids()[:12]}...")
    return f"{type(tok).__name__} gives the sentencepiece ids ({len(got)} tokens)"


def _negative_tokenizer() -> None:
    tok = AutoTokenizer.from_pretrained(str(_tiny("llava-v1.5-tiny-safetensors")), use_fast=False)
    if tok(PROMPT).input_ids != expected_prompt_ids():
        raise AssertionError(f"prompt ids differ under AutoTokenizer ({type(tok).__name__})")


# ---------------------------------------------------------------- bos-default (legacy)

IMAGE_PROMPT = "A chat between a curious human and an artificial intelligence assistant. USER: <image>\nWhat is in it? ASSISTANT:"


def _image_prompt_ids(tok) -> list[int]:
    from llava.mm_utils import tokenizer_image_token  # noqa: PLC0415 - optional dependency

    return list(tokenizer_image_token(IMAGE_PROMPT, tok, -200))


def _verify_bos_default() -> str:
    variant = nobos_variant()
    tok = legacy.legacy_tokenizer(variant)
    reference = legacy.legacy_tokenizer(_tiny("llava-v1.5-tiny-safetensors"))
    got, want = _image_prompt_ids(tok), _image_prompt_ids(reference)
    if got != want or got[0] != tok.bos_token_id or tok(PROMPT).input_ids != expected_prompt_ids():
        raise AssertionError(f"BOS missing or ids differ without add_bos_token: {got[:6]} vs {want[:6]}")
    return "a tokenizer_config.json without add_bos_token gives the same ids, BOS first (with <image>\\n too)"


def _negative_bos_default() -> None:
    variant = nobos_variant()
    config = json.loads((variant / "tokenizer_config.json").read_text())
    tok = getattr(transformers, config.get("tokenizer_class") or "LlamaTokenizer").from_pretrained(
        str(variant)
    )
    ids = _image_prompt_ids(tok)
    if ids[0] != tok.bos_token_id:
        raise AssertionError(f"BOS missing: prompt ids start {ids[:4]}, not with {tok.bos_token_id}")


# ---------------------------------------------------------------- legacy-import

_BLOCK_PIL = "import sys; sys.modules['PIL'] = None; "


def _import_in_subprocess(code: str) -> str:
    """Last stderr line of `code` run in a fresh interpreter (empty if it succeeded)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if proc.returncode and lines else ""


def _verify_legacy_import() -> str:
    from llava.model import LlavaLlamaForCausalLM  # noqa: F401, PLC0415 - the import is the check

    message = _import_in_subprocess(
        "from dymu.compat.legacy import import_legacy; " + _BLOCK_PIL + "import_legacy()"
    )
    if "pillow" not in message:
        raise AssertionError(f"a missing Pillow was not reported by name: {message!r}")
    return "imports; a missing dependency is named (Pillow blocked -> 'needs pillow')"


def _negative_legacy_import() -> None:
    message = _import_in_subprocess(_BLOCK_PIL + "from llava.model import LlavaLlamaForCausalLM")
    if message:
        raise ImportError(message)


# ---------------------------------------------------------------- registry of checks

CHECKS: dict[str, Check] = {
    "scatter": Check(_verify_scatter, _negative_scatter),
    "weights-only": Check(_verify_weights_only, _negative_weights_only),
    "safetensors": Check(_verify_safetensors, _negative_safetensors),
    "cache-format": Check(_verify_cache_generate, _negative_cache_format),
    "cache-layers": Check(_verify_cache_layers, _negative_cache_layers),
    "cache-keyword": Check(_verify_cache_generate, _negative_cache_keyword),
    "static-cache": Check(_verify_static_cache, _negative_static_cache),
    "causal-mask": Check(_verify_causal_mask, _negative_causal_mask),
    "mask-helper": Check(_verify_causal_mask, _negative_causal_mask),
    "dtype-kwarg": Check(_verify_dtype_kwarg, _negative_dtype_kwarg),
    "image-tokens": Check(_verify_image_tokens, _negative_image_tokens),
    "rope-parameters": Check(_verify_rope_parameters, _negative_rope_parameters),
    "generate-kwargs": Check(_verify_legacy_generate, _negative_legacy_generate, LEGACY),
    "cache-rename": Check(_verify_legacy_generate, _negative_legacy_generate, LEGACY),
    "loader-kwargs": Check(_verify_loader_kwargs, _negative_loader_kwargs, LEGACY),
    "builder-dtype": Check(_verify_builder_dtype, _negative_builder_dtype, LEGACY),
    "tokenizer": Check(_verify_tokenizer, _negative_tokenizer, ("sentencepiece", "protobuf")),
    "legacy-import": Check(_verify_legacy_import, _negative_legacy_import, LEGACY),
    "bos-default": Check(_verify_bos_default, _negative_bos_default, (*LEGACY, "sentencepiece", "protobuf")),
}


def check(fix: Fix, negative: bool = True) -> dict[str, str]:
    """Run verify() (with the active patch set applied) and, where needed, the negative control;
    every attribute the patch set replaced is restored afterwards, so a check leaves no trace."""
    with legacy.patches_restored():
        return _check(fix, negative)


def _check(fix: Fix, negative: bool) -> dict[str, str]:
    is_needed, why = fix.needed()
    result = {"fix": fix.name, "needed": "yes" if is_needed else "no", "why": why}
    impl = CHECKS[fix.name]
    missing = [p for p in impl.requires if installed(p) is None]
    if missing:
        result.update(verify="n.a.", detail=f"needs {', '.join(missing)}", negative="n.a.")
        return result
    off = fix.name in disabled()
    if off:
        result["disabled"] = "by the cell (--disable-fixes)"
    try:
        legacy.apply_patch_set()  # verify the runtime as it runs: every active fix applied
        result.update(verify="held", detail=impl.verify())
    except Exception as err:
        result.update(
            verify="failed",
            detail=f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}",
        )
    if not (negative and is_needed and impl.negative):
        result["negative"] = "not run" if not is_needed else "none"
        return result
    try:
        impl.negative()
        result["negative"] = "did not fail"
    except Exception as err:
        text = f"{type(err).__name__}: {err}"
        result["negative"] = "failed as documented" if re.search(fix.error, text) else "failed differently"
        result["negative_error"] = text.splitlines()[0][:200]
    return result


def check_all(negative: bool = True) -> list[dict[str, str]]:
    """Every fix's check, in the patch data's order."""
    unregistered = sorted(set(fixes()) ^ set(CHECKS))
    if unregistered:
        raise RuntimeError(f"fixes without a check, or checks without a fix: {unregistered}")
    return [check(fix, negative) for fix in fixes().values()]
