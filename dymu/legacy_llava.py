"""The liuhaotian family: the legacy `llava` package (`llava-torch==1.2.2.post1`, installed
`--no-deps`), loaded through its own `llava.model.builder.load_pretrained_model` and patched
at run time by `dymu.compat` (never vendored or edited on disk).

Runtime needs beyond torch/transformers: pillow and accelerate (the builder always passes a
device_map), and sentencepiece + protobuf: liuhaotian checkpoints ship only `tokenizer.model`
(transformers 4.x reads it with the slow tokenizer, 5.x converts it).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import DymuError
from .llava import IMAGE

INSTALL_HINT = (
    "pip install --no-deps llava-torch==1.2.2.post1 && pip install pillow accelerate sentencepiece protobuf"
)


def import_legacy() -> Any:
    """Import the package's model module directly, reporting the real error (the legacy-import fix).

    `llava/model/__init__.py` wraps its imports in a bare `try/except: pass`, so a missing
    dependency otherwise surfaces later as "cannot import name 'LlavaLlamaForCausalLM'".
    """
    needs = (
        ("PIL", "pillow"),
        ("accelerate", "accelerate"),
        ("sentencepiece", "sentencepiece"),
        ("google.protobuf", "protobuf"),
    )  # the last two read the checkpoints' tokenizer.model
    for module, package in needs:
        try:
            __import__(module)
        except ImportError:
            raise DymuError(f"the legacy llava package needs {package}: pip install {package}") from None
    try:
        from llava.model.language_model import llava_llama
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "llava":
            raise DymuError(f"the legacy llava package is not installed: {INSTALL_HINT}") from None
        raise DymuError(f"the legacy llava package cannot import: {err}") from None
    except ImportError as err:
        raise DymuError(f"the legacy llava package cannot import: {err}") from None
    return llava_llama


def legacy_tokenizer(path: str | Path) -> Any:
    """The tokenizer class the checkpoint names in tokenizer_config.json (the tokenizer fix).

    transformers 5.0-5.2 resolve `AutoTokenizer` for `llava_llama` configs to a tokenizer
    that yields different ids; naming the class avoids the guess on every version.
    """
    import transformers

    cfg_file = Path(path) / "tokenizer_config.json"
    name = "LlamaTokenizer"
    if cfg_file.is_file():
        name = json.loads(cfg_file.read_text(encoding="utf-8")).get("tokenizer_class") or name
    cls = getattr(transformers, name, None) or transformers.LlamaTokenizerFast
    return cls.from_pretrained(str(path))


@contextlib.contextmanager
def _builder_dtype(cls: type, dtype: torch.dtype) -> Iterator[None]:
    """Make the builder's hard-coded `torch_dtype=torch.float16` the caller's dtype.

    Loading in fp16 and casting afterwards is lossy: transformers < 4.43 builds its RoPE
    tables at init in the load dtype, so an fp32 model would keep fp16-rounded cos/sin.
    """
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


def load_legacy(path: str | Path, dtype: torch.dtype, device: str) -> tuple[torch.nn.Module, Any, Any]:
    """(model, tokenizer, image processor) via the package's own `load_pretrained_model`."""
    from .compat import apply_patch_set

    legacy = import_legacy()
    apply_patch_set()
    from llava.model.builder import load_pretrained_model

    # model_name only has to contain "llava" for the builder to pick LlavaLlamaForCausalLM
    with _builder_dtype(legacy.LlavaLlamaForCausalLM, dtype):
        _, model, image_processor, _ = load_pretrained_model(
            str(path), None, "llava-v1.5", device_map=device, device=device
        )
    tokenizer = legacy_tokenizer(path)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, image_processor


def tokenize(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids with IMAGE at `<image>`, through the package's own `tokenizer_image_token`."""
    from llava.mm_utils import tokenizer_image_token

    ids = list(tokenizer_image_token(prompt, tokenizer, IMAGE))
    if ids.count(IMAGE) != 1:
        raise DymuError(f"prompt must contain '<image>' exactly once (found {ids.count(IMAGE)})")
    return ids
