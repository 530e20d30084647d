"""Fixes for the legacy `llava` package (llava-torch 1.2.2.post1) on newer transformers."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from importlib import resources
from typing import Any

import torch

from ..versions import transformers_at_least
from . import register
from .core import greedy_without_cache

LEGACY = ("llava-torch",)

# ---------------------------------------------------------------- generate-kwargs


def _legacy_class():
    from ..legacy_llava import import_legacy

    return import_legacy().LlavaLlamaForCausalLM


def _apply_generate_kwargs() -> None:
    """Let the legacy forward take what generate passes: drop `cache_position` (LlamaModel
    derives it from the cache) and hand `cache` (5.24+) on as `past_key_values`."""
    cls = _legacy_class()
    if getattr(cls.forward, "_dymu_original", None) is not None:
        return
    original = cls.forward

    def forward(self, *args: Any, cache_position: Any = None, cache: Any = None, **kwargs: Any):
        if cache is not None:
            if kwargs.get("past_key_values") is not None:
                raise TypeError("both `cache` and `past_key_values` were passed")
            kwargs["past_key_values"] = cache
        return original(self, *args, **kwargs)

    # generate validates its kwargs against forward's signature: show the original one + ours
    sig = inspect.signature(original)
    extra = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
        for n in ("cache_position", "cache")
    ]
    forward.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])  # type: ignore[attr-defined]
    forward.__doc__ = original.__doc__
    forward._dymu_original = original  # type: ignore[attr-defined]
    cls.forward = forward


def _tiny_legacy():
    from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlavaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=128)  # fmt: skip
    return LlavaLlamaForCausalLM(cfg).eval()


def _legacy_generate(model) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import GenerationMixin

    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    out = GenerationMixin.generate(model, input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1] :], greedy_without_cache(model, ids, 5)


def _verify_generate_kwargs() -> str:
    got, want = _legacy_generate(_tiny_legacy())
    if not torch.equal(got, want):  # a swallowed cache decodes from the last token alone
        raise AssertionError(f"cached generate {got.tolist()} != recomputed greedy {want.tolist()}")
    return "legacy generate with the cache equals greedy recomputation"


def _negative_generate_kwargs() -> None:
    cls = _legacy_class()
    patched = cls.forward
    cls.forward = getattr(patched, "_dymu_original", patched)
    try:
        _legacy_generate(_tiny_legacy())
    finally:
        cls.forward = patched


# one forward wrapper serves both names; each is checked where its transformers range needs it
for _name in ("generate-kwargs", "cache-rename"):
    register(_name, verify=_verify_generate_kwargs, negative=_negative_generate_kwargs,
             apply=_apply_generate_kwargs, requires=LEGACY)  # fmt: skip

# ---------------------------------------------------------------- loader-kwargs


def translate_loader_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The builder's `from_pretrained` kwargs, in the names this transformers accepts."""
    kw = dict(kwargs)
    if transformers_at_least("4.56") and "torch_dtype" in kw:
        kw["dtype"] = kw.pop("torch_dtype")
    if "quantization_config" in kw:  # 4.38+ refuses load_in_4bit beside quantization_config
        kw.pop("load_in_4bit", None)
        kw.pop("load_in_8bit", None)
    elif transformers_at_least("5.0"):
        eight, four = bool(kw.pop("load_in_8bit", False)), bool(kw.pop("load_in_4bit", False))
        if eight or four:
            from transformers import BitsAndBytesConfig

            kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=eight, load_in_4bit=four)
    return kw


def _apply_loader_kwargs() -> None:
    cls = _legacy_class()
    if getattr(cls, "_dymu_loader", False):
        return
    original = cls.from_pretrained.__func__

    def from_pretrained(klass, *args: Any, **kwargs: Any):
        return original(klass, *args, **translate_loader_kwargs(kwargs))

    cls.from_pretrained = classmethod(from_pretrained)
    cls._dymu_loader = True


def _verify_loader_kwargs() -> str:
    from ..tiny import ensure_tiny_checkpoints

    kw = translate_loader_kwargs(
        {"torch_dtype": torch.float16, "load_in_8bit": False, "device_map": {"": "cpu"}}
    )
    expected_dtype_key = "dtype" if transformers_at_least("4.56") else "torch_dtype"
    if kw.get(expected_dtype_key) is not torch.float16:
        raise AssertionError(f"dtype not passed as {expected_dtype_key}: {kw}")
    if transformers_at_least("5.0") and "load_in_8bit" in kw:
        raise AssertionError("load_in_8bit still passed to transformers >= 5.0")
    model = _legacy_class().from_pretrained(
        str(ensure_tiny_checkpoints()["llava-v1.5-tiny-safetensors"]), torch_dtype=torch.float16
    )
    if next(model.parameters()).dtype != torch.float16:
        raise AssertionError("the builder's dtype request was lost")
    return f"builder kwargs load the tiny legacy model (dtype via `{expected_dtype_key}`)"


def _negative_loader_kwargs() -> None:
    from ..tiny import ensure_tiny_checkpoints

    cls = _legacy_class()
    original = super(cls, cls).from_pretrained  # the inherited, untranslated loader
    original(str(ensure_tiny_checkpoints()["llava-v1.5-tiny-safetensors"]), load_in_8bit=True)


register("loader-kwargs", verify=_verify_loader_kwargs, negative=_negative_loader_kwargs,
         apply=_apply_loader_kwargs, requires=LEGACY)  # fmt: skip

# ---------------------------------------------------------------- tokenizer

PROMPT = "A chat between a curious human and an artificial intelligence assistant. USER: What is in the picture? ASSISTANT:"


def expected_prompt_ids() -> list[int]:
    """Ids of PROMPT under the tiny sentencepiece model, recorded once from sentencepiece itself."""
    data = resources.files("dymu").joinpath("data/tiny_prompt_ids.json").read_text(encoding="utf-8")
    return json.loads(data)["ids"]


def _verify_tokenizer() -> str:
    from ..legacy_llava import legacy_tokenizer
    from ..tiny import ensure_tiny_checkpoints

    tok = legacy_tokenizer(ensure_tiny_checkpoints()["llava-v1.5-tiny-safetensors"])
    got = tok(PROMPT).input_ids
    if got != expected_prompt_ids():
        raise AssertionError(f"prompt ids differ: {got[:12]}... vs {expected_prompt_ids()[:12]}...")
    return f"{type(tok).__name__} gives the sentencepiece ids ({len(got)} tokens)"


def _negative_tokenizer() -> None:
    from transformers import AutoTokenizer

    from ..tiny import ensure_tiny_checkpoints

    tok = AutoTokenizer.from_pretrained(
        str(ensure_tiny_checkpoints()["llava-v1.5-tiny-safetensors"]), use_fast=False
    )
    if tok(PROMPT).input_ids != expected_prompt_ids():
        raise AssertionError(f"prompt ids differ under AutoTokenizer ({type(tok).__name__})")


register(
    "tokenizer",
    verify=_verify_tokenizer,
    negative=_negative_tokenizer,
    requires=("sentencepiece", "protobuf"),
)

# ---------------------------------------------------------------- legacy-import

_BLOCK_PIL = "import sys; sys.modules['PIL'] = None; "


def _import_in_subprocess(code: str) -> str:
    """Last stderr line of `code` run in a fresh interpreter (empty if it succeeded)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if proc.returncode and lines else ""


def _apply_legacy_import() -> None:
    from ..legacy_llava import import_legacy

    import_legacy()


def _verify_legacy_import() -> str:
    from llava.model import LlavaLlamaForCausalLM  # noqa: F401 - the import is the check

    message = _import_in_subprocess(
        "from dymu.legacy_llava import import_legacy; " + _BLOCK_PIL + "import_legacy()"
    )
    if "pillow" not in message:
        raise AssertionError(f"a missing Pillow was not reported by name: {message!r}")
    return "imports; a missing dependency is named (Pillow blocked -> 'needs pillow')"


def _negative_legacy_import() -> None:
    message = _import_in_subprocess(_BLOCK_PIL + "from llava.model import LlavaLlamaForCausalLM")
    if message:
        raise ImportError(message)


register("legacy-import", verify=_verify_legacy_import, negative=_negative_legacy_import,
         apply=_apply_legacy_import, requires=LEGACY)  # fmt: skip
