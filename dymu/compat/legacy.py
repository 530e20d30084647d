"""Runtime shims for the legacy `llava` package (`llava-torch==1.2.2.post1`, installed
`--no-deps`), patched at run time and never edited on disk. Each patch is the `apply()` of a
fix in `patches/fixes.toml`; `apply_patch_set` applies the active ones (idempotent).

Runtime needs beyond torch/transformers: pillow and accelerate (the builder always passes a
device_map), and sentencepiece + protobuf: liuhaotian checkpoints ship only
`tokenizer.model` (transformers 4.x reads it with the slow tokenizer, 5.x converts it).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import transformers

from ..errors import DymuError
from ..versions import installed
from .registry import active
from .shims import safe_load

INSTALL_HINT = (
    "pip install --no-deps llava-torch==1.2.2.post1 && pip install pillow accelerate sentencepiece protobuf"
)
NEEDS = (("PIL", "pillow"), ("accelerate", "accelerate"), ("sentencepiece", "sentencepiece"),
         ("google.protobuf", "protobuf"))  # fmt: skip


# ---------------------------------------------------------------- legacy-import


def missing_dependencies() -> list[str]:
    """Every package the legacy family needs that is not importable here, checked all at once
    (a user fixes them in one go, not one error per run)."""
    missing = []
    for module, package in NEEDS:
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if installed("llava-torch") is None:
        missing.append("llava-torch")
    return missing


def install_command(missing: list[str]) -> str:
    """One shell command that installs `missing`: llava-torch goes in with --no-deps (its own pins
    would downgrade torch and transformers), the rest normally."""
    plain = [p for p in missing if p != "llava-torch"]
    parts = [f"pip install {' '.join(plain)}"] if plain else []
    if "llava-torch" in missing:
        parts.append("pip install --no-deps llava-torch==1.2.2.post1")
    return " && ".join(parts) + " (or pip install 'dymu[legacy]' for all but llava-torch)"


def import_legacy() -> Any:
    """The package's model module, imported directly so the real error is reported.

    `llava/model/__init__.py` wraps its imports in a bare `try/except: pass`, so a missing
    dependency otherwise surfaces later as "cannot import name 'LlavaLlamaForCausalLM'".
    """
    missing = missing_dependencies()
    if missing:
        raise DymuError(
            f"the legacy (liuhaotian) family needs {', '.join(missing)}: {install_command(missing)}"
        )
    try:
        from llava.model.language_model import llava_llama  # noqa: PLC0415 - optional dependency
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "llava":
            raise DymuError(f"the legacy llava package is not installed: {INSTALL_HINT}") from None
        raise DymuError(f"the legacy llava package cannot import: {err}") from None
    except ImportError as err:
        raise DymuError(f"the legacy llava package cannot import: {err}") from None
    return llava_llama


def legacy_class() -> type:
    return import_legacy().LlavaLlamaForCausalLM


# ---------------------------------------------------------------- tokenizer


def legacy_tokenizer(path: str | Path) -> Any:
    """The tokenizer class the checkpoint names in tokenizer_config.json: transformers 5.0-5.2
    resolve `AutoTokenizer` for `llava_llama` configs to one that yields different ids; naming
    the class avoids the guess on every version. A config without `add_bos_token` gets BOS
    explicitly where this transformers would otherwise add none (the bos-default fix)."""
    cfg_file = Path(path) / "tokenizer_config.json"
    config = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    name = config.get("tokenizer_class") or "LlamaTokenizer"
    cls = getattr(transformers, name, None) or transformers.LlamaTokenizerFast
    kwargs = {"add_bos_token": True} if active("bos-default") and "add_bos_token" not in config else {}
    return cls.from_pretrained(str(path), **kwargs)


# ---------------------------------------------------------------- builder-dtype


@contextlib.contextmanager
def builder_dtype(cls: type, dtype: torch.dtype) -> Iterator[None]:
    """Make the builder's hard-coded `torch_dtype=torch.float16` the caller's dtype (loading in
    fp16 and casting afterwards rounds every weight; < 4.43 also bakes fp16 RoPE tables)."""
    if not active("builder-dtype"):
        yield
        return
    original = cls.__dict__.get("from_pretrained")
    inherited = cls.from_pretrained.__func__

    def from_pretrained(klass, *args: Any, **kwargs: Any):
        for key in ("torch_dtype", "dtype"):
            if key in kwargs:
                kwargs[key] = dtype
        return inherited(klass, *args, **kwargs)

    cls.from_pretrained = classmethod(from_pretrained)
    try:
        yield
    finally:
        if original is None:
            del cls.from_pretrained
        else:
            cls.from_pretrained = original


# ---------------------------------------------------------------- generate-kwargs, cache-rename


def patch_forward() -> None:
    """Let the legacy forward take what generate passes: drop `cache_position` (LlamaModel
    derives it from the cache) and hand `cache` (5.24+) on as `past_key_values`."""
    cls = legacy_class()
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


# ---------------------------------------------------------------- loader-kwargs


def translate_loader_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The builder's `from_pretrained` kwargs, in the names this transformers accepts."""
    kw = dict(kwargs)
    if not active("dtype-kwarg") and "torch_dtype" in kw:
        kw["dtype"] = kw.pop("torch_dtype")
    if "quantization_config" in kw:  # 4.38+ refuses load_in_4bit beside quantization_config
        kw.pop("load_in_4bit", None)
        kw.pop("load_in_8bit", None)
    elif active("loader-kwargs"):
        eight, four = bool(kw.pop("load_in_8bit", False)), bool(kw.pop("load_in_4bit", False))
        if eight or four:
            kw["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=eight, load_in_4bit=four)
    return kw


def patch_loader() -> None:
    cls = legacy_class()
    if getattr(cls, "_dymu_loader", False):
        return
    original = cls.from_pretrained.__func__

    def from_pretrained(klass, *args: Any, **kwargs: Any):
        return original(klass, *args, **translate_loader_kwargs(kwargs))

    cls.from_pretrained = classmethod(from_pretrained)
    cls._dymu_loader = True


# ---------------------------------------------------------------- weights-only


def patch_builder_torch_load() -> None:
    """Route the legacy builder's torch.load calls (projector / LoRA files) through safe_load."""
    if installed("llava-torch") is None:
        return
    from llava.model import builder  # noqa: PLC0415 - optional dependency

    if getattr(builder.torch, "_dymu_safe", False):
        return

    class _SafeTorch(types.ModuleType):
        _dymu_safe = True
        load = staticmethod(safe_load)

        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

    builder.torch = _SafeTorch("torch")


# ---------------------------------------------------------------- the patch set

APPLY: dict[str, Callable[[], Any]] = {
    "legacy-import": import_legacy,
    "generate-kwargs": patch_forward,
    "cache-rename": patch_forward,
    "loader-kwargs": patch_loader,
    "weights-only": patch_builder_torch_load,
}


def apply_patch_set() -> list[str]:
    """Apply every active fix that patches something (idempotent); returns their names."""
    applied = [name for name in APPLY if active(name)]
    for name in applied:
        APPLY[name]()
    return applied


_ABSENT = object()  # an attribute the owner did not define itself


def _patch_targets() -> list[tuple[Any, str]]:
    """Every (owner, attribute) that a fix's apply() or `builder_dtype` may replace; none without
    the legacy package (nothing is patched then)."""
    if installed("llava-torch") is None:
        return []
    try:
        cls = legacy_class()
    except DymuError:
        return []
    from llava.model import builder  # noqa: PLC0415 - optional dependency

    return [(cls, "forward"), (cls, "from_pretrained"), (cls, "_dymu_loader"), (builder, "torch")]


def patch_state() -> dict[str, Any]:
    """The patchable attributes as their owners define them (`_ABSENT` where inherited or unset):
    equal before and after a block means the block left no patch behind."""
    return {f"{owner.__name__}.{name}": vars(owner).get(name, _ABSENT) for owner, name in _patch_targets()}


@contextlib.contextmanager
def patches_restored() -> Iterator[None]:
    """Restore, when the block ends, every attribute a fix's apply() may have replaced in it.

    Checks run under this, so a fix applied for a check never outlives it: a later test in the
    same process sees only what its own versions' patch set does (a narrowed range then shows
    up as the failure it would cause, whatever ran before)."""
    saved = [(owner, name, vars(owner).get(name, _ABSENT)) for owner, name in _patch_targets()]
    try:
        yield
    finally:
        for owner, name, value in saved:
            if value is _ABSENT:
                if name in vars(owner):
                    delattr(owner, name)
            else:
                setattr(owner, name, value)
