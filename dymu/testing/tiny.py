"""A tiny, deterministic, LLaVA-1.5-shaped model in both checkpoint formats.

Why: no weights can be downloaded here, yet every matrix cell must run the *real* loading code of the
legacy ``llava`` package and of ``transformers.LlavaForConditionalGeneration`` and compare its
outputs with golden values written by the reference cell. So the fixture must be

* small (CPU, seconds),
* bit-identical on every (torch, transformers, numpy) stack: all weights come from
  ``numpy.random.default_rng(spec.seed)`` in a fixed order (see :func:`parameter_inits`), and every
  JSON file is written by hand from dicts, not by one transformers version's ``save_pretrained``,
* shaped like the real checkpoints: the same key names, config keys, tokenizer files and image
  processor settings as ``liuhaotian/llava-v1.5-7b`` (+ ``openai/clip-vit-large-patch14-336``) and
  ``llava-hf/llava-1.5-7b-hf``, only with small dims.

What :func:`build_tiny_checkpoints` writes (keys of the returned dict are the directory names)::

    clip/                         CLIPVisionModel + CLIPImageProcessor (the legacy vision tower)
    llava-v1.5-tiny-bin/          liuhaotian layout, pytorch_model.bin   (legacy ``llava`` package)
    llava-v1.5-tiny-safetensors/  liuhaotian layout, model.safetensors
    llava-hf-tiny-safetensors/    llava-hf layout, model.safetensors     (LlavaForConditionalGeneration)
    llava-hf-tiny-bin/            llava-hf layout, pytorch_model.bin

The legacy configs point ``mm_vision_tower`` at the *absolute* path of ``clip/`` (the legacy builder
accepts any existing path), so a built tree is not relocatable: use :func:`ensure_tiny_checkpoints`,
which builds once into a cache directory and renames it into place atomically.

Packages each path needs:

* building: numpy, torch, safetensors (no transformers, no sentencepiece);
* legacy format, slow tokenizer (``AutoTokenizer(..., use_fast=False)`` as ``llava`` does, only on
  transformers < 5): ``sentencepiece`` and ``protobuf`` (``legacy: false`` makes the slow Llama
  tokenizer rewrite the sentencepiece proto);
* fast tokenizer, llava-hf format: ``tokenizers`` only (``tokenizer.json`` is shipped there);
* legacy format on transformers 5: ``sentencepiece`` and ``protobuf`` to convert ``tokenizer.model``
  (the liuhaotian dirs, like the real ones, have no ``tokenizer.json``);
* llava-hf ``AutoProcessor``: transformers >= 4.43 (older ones raise TypeError on the hub-shaped
  ``processor_config.json``); >= 4.45 to expand ``<image>`` into one token per image feature.

Known, deliberate differences from the real checkpoints are listed in :data:`KNOWN_DIFFERENCES`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..images import CLIP_MEAN, CLIP_STD

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
TOKENIZER_MODEL = DATA_DIR / "tiny_tokenizer.model"
TOKENIZER_JSON = DATA_DIR / "tiny_tokenizer.json"
# The shapes-task weights (scripts/train_tiny.py), under the names of parameter_inits.
TRAINED_WEIGHTS = DATA_DIR / "tiny_trained.safetensors"

# Bump when anything that changes the written files changes (layout, init rule, config keys): it is
# part of the cache key, so stale caches are never reused.
FIXTURE_VERSION = 3  # 2: legacy dirs ship tokenizer.model only; 3: trained weights by default

CLIP_DIR = "clip"
LEGACY_BIN = "llava-v1.5-tiny-bin"
LEGACY_SAFETENSORS = "llava-v1.5-tiny-safetensors"
HF_SAFETENSORS = "llava-hf-tiny-safetensors"
HF_BIN = "llava-hf-tiny-bin"
ALL_DIRS = (CLIP_DIR, LEGACY_BIN, LEGACY_SAFETENSORS, HF_SAFETENSORS, HF_BIN)
MANIFEST = "tiny_manifest.json"

# The sentencepiece model in dymu/data has exactly this many pieces (checked at build time).
TEXT_VOCAB_SIZE = 512
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


SerializationFormat = Literal["safetensors", "bin"]

KNOWN_DIFFERENCES = (
    "Vision tower checkpoint is a bare CLIPVisionModel (model_type clip_vision_model); "
    "openai/clip-vit-large-patch14-336 is a full CLIPModel checkpoint.",
    "Legacy checkpoints hold no vision tower weights; the legacy builder loads them from mm_vision_tower.",
    "Tokenizer is a 512-piece sentencepiece BPE trained on a few lines of English, not Llama's 32000.",
    "The llava-hf dirs ship tokenizer.json; the liuhaotian dirs ship only tokenizer.model, as "
    "liuhaotian/llava-v1.5-7b does, so transformers 5 must convert the sentencepiece model (needs "
    "sentencepiece + protobuf) and 5.0-5.2's AutoTokenizer mis-resolution is reproduced.",
    "The llava-hf vocab is padded from 514 to a multiple of 64 (576) with zero rows in embed_tokens "
    "and lm_head, as llava-hf pads 32002 to 32064; zero lm_head rows give logit 0.",
    "tokenizer.json uses Metaspace(prepend_scheme='first'), what 'legacy: false' means, so slow and "
    "fast tokenizers and transformers 4 and 5 agree; the hub's Llama tokenizer.json files use the "
    "legacy Prepend normalizer, which puts a '▁' after special tokens such as <image>.",
    "So for 'USER: <image>\\n...' the legacy llava ids (tokenizer_image_token tokenizes the text after "
    "the image on its own, with a dummy-prefix '▁', id 456) have one token more than llava-hf's: feed "
    "both formats the same ids when comparing their logits.",
)


@dataclass(frozen=True)
class TinySpec:
    """Dimensions of the tiny LLaVA-1.5 (the real 7B values in comments).

    Frozen and hashable so that it can key a cache (:meth:`digest`).
    """

    image_size: int = 112  # 336
    patch_size: int = 14  # 14 -> 8 x 8 = 64 patches (576)
    vision_hidden_size: int = 64  # 1024
    vision_num_layers: int = 4  # 24
    vision_num_heads: int = 4  # 16
    vision_intermediate_size: int = 256  # 4096
    vision_layer_norm_eps: float = 1e-5
    text_hidden_size: int = 64  # 4096
    text_num_layers: int = 2  # 32
    text_num_heads: int = 4  # 32
    text_num_kv_heads: int = 4  # 32
    text_intermediate_size: int = 128  # 11008
    max_position_embeddings: int = 2048  # 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    vision_select_layer: int = -2
    projector_type: str = "mlp2x_gelu"
    hf_vocab_multiple: int = 64  # llava-hf pads 32002 -> 32064
    seed: int = 0
    # "trained": the shapes-task weights committed in TRAINED_WEIGHTS (default dims only), so the
    # model answers true things; "random": the seeded draw of parameter_inits, for what needs
    # weights no training shaped (and the starting point of the training).
    weights: Literal["trained", "random"] = "trained"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.vision_hidden_size % self.vision_num_heads or self.text_hidden_size % self.text_num_heads:
            raise ValueError("hidden sizes must be divisible by the number of heads")
        if self.text_num_heads % self.text_num_kv_heads:
            raise ValueError("text_num_heads must be a multiple of text_num_kv_heads")
        if self.projector_type != "mlp2x_gelu":
            raise ValueError("only the LLaVA-1.5 projector (mlp2x_gelu) is built")
        if self.weights not in ("trained", "random"):
            raise ValueError(f"weights={self.weights!r}: expected 'trained' or 'random'")

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (what LLaVA feeds the LLM with the 'patch'/'default' strategy)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """CLIP positions: the patches plus CLS."""
        return self.num_patches + 1

    @property
    def image_token_id(self) -> int:
        """Id of the added ``<image>`` token in the llava-hf tokenizer (32000 in llava-hf)."""
        return TEXT_VOCAB_SIZE

    @property
    def pad_token_id(self) -> int:
        """Id of the added ``<pad>`` token in the llava-hf tokenizer (32001 in llava-hf)."""
        return TEXT_VOCAB_SIZE + 1

    @property
    def hf_vocab_size(self) -> int:
        """Embedding rows of the llava-hf model: text vocab + 2 added tokens, padded."""
        n, m = TEXT_VOCAB_SIZE + 2, self.hf_vocab_multiple
        return -(-n // m) * m

    def digest(self) -> str:
        """Short hash of everything that determines the written files (cache key)."""
        h = hashlib.sha256()
        h.update(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())
        h.update(f"fixture={FIXTURE_VERSION}".encode())
        h.update(TOKENIZER_MODEL.read_bytes())
        h.update(TOKENIZER_JSON.read_bytes())
        if self.weights == "trained":
            h.update(TRAINED_WEIGHTS.read_bytes())
        return h.hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class ParamInit:
    """One tensor of the fixture: ``mean + std * N(0, 1)``, drawn in float64, stored as float32."""

    name: str
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0


def parameter_inits(spec: TinySpec = TinySpec()) -> list[ParamInit]:
    """Every tensor of the fixture, sorted by name: this is the order the RNG is consumed in.

    Names are the checkpoint keys of the ``clip/`` dir (``vision_model.*``) and of the legacy dirs
    (``model.*``, ``lm_head.weight``); the llava-hf keys are derived from them (:func:`hf_state_dict`).

    Scales, and why (``d`` = hidden size):

    * Linear / conv weights: std ``1/sqrt(fan_in)``, so activations keep unit scale through the
      blocks and attention logits are O(1): attention is neither uniform nor one-hot, and each layer
      changes the residual stream noticeably. (std 0.02, the HF init, makes a 64-wide model almost
      an identity map: every prompt gives nearly the same logits.)
    * Norm weights ``1 + 0.1 N``, biases ``0.1 N``: never exactly 1 or 0, so a bias or norm that
      silently fails to load (and keeps its default init) changes outputs and fails comparisons.
    * CLIP position embedding std 0.1, small next to the patch content (~1): patches of one flat
      colour stay nearly parallel, so DToMe has something to merge in flat regions, while textured
      patches differ.
    * Text embeddings std 1 (RMSNorm removes the scale; the residual stream starts at unit scale,
      like the block outputs, so context matters). ``lm_head`` std 0.5: logits have std ~4, peaked
      enough that greedy decoding is stable across backends yet varied across prompts and images.
    """
    s = spec
    dv, dt = s.vision_hidden_size, s.text_hidden_size
    p, iv, it = s.patch_size, s.vision_intermediate_size, s.text_intermediate_size
    head_dim = dt // s.text_num_heads
    kv = s.text_num_kv_heads * head_dim

    def lin(name: str, out_f: int, in_f: int, bias: bool) -> list[ParamInit]:
        items = [ParamInit(f"{name}.weight", (out_f, in_f), in_f**-0.5)]
        if bias:
            items.append(ParamInit(f"{name}.bias", (out_f,), 0.1))
        return items

    def norm(name: str, d: int, bias: bool) -> list[ParamInit]:
        items = [ParamInit(f"{name}.weight", (d,), 0.1, mean=1.0)]
        if bias:
            items.append(ParamInit(f"{name}.bias", (d,), 0.1))
        return items

    inits: list[ParamInit] = [
        ParamInit("vision_model.embeddings.class_embedding", (dv,), 1.0),
        ParamInit("vision_model.embeddings.patch_embedding.weight", (dv, 3, p, p), (3 * p * p) ** -0.5),
        ParamInit("vision_model.embeddings.position_embedding.weight", (s.num_positions, dv), 0.1),
        *norm("vision_model.pre_layrnorm", dv, bias=True),
        *norm("vision_model.post_layernorm", dv, bias=True),
    ]
    for i in range(s.vision_num_layers):
        pre = f"vision_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            inits += lin(f"{pre}.self_attn.{proj}", dv, dv, bias=True)
        inits += norm(f"{pre}.layer_norm1", dv, bias=True)
        inits += norm(f"{pre}.layer_norm2", dv, bias=True)
        inits += lin(f"{pre}.mlp.fc1", iv, dv, bias=True)
        inits += lin(f"{pre}.mlp.fc2", dv, iv, bias=True)

    inits += lin("model.mm_projector.0", dt, dv, bias=True)
    inits += lin("model.mm_projector.2", dt, dt, bias=True)
    inits.append(ParamInit("model.embed_tokens.weight", (TEXT_VOCAB_SIZE, dt), 1.0))
    inits += norm("model.norm", dt, bias=False)
    inits.append(ParamInit("lm_head.weight", (TEXT_VOCAB_SIZE, dt), 0.5))
    for i in range(s.text_num_layers):
        pre = f"model.layers.{i}"
        inits += lin(f"{pre}.self_attn.q_proj", dt, dt, bias=False)
        inits += lin(f"{pre}.self_attn.k_proj", kv, dt, bias=False)
        inits += lin(f"{pre}.self_attn.v_proj", kv, dt, bias=False)
        inits += lin(f"{pre}.self_attn.o_proj", dt, dt, bias=False)
        inits += lin(f"{pre}.mlp.gate_proj", it, dt, bias=False)
        inits += lin(f"{pre}.mlp.up_proj", it, dt, bias=False)
        inits += lin(f"{pre}.mlp.down_proj", dt, it, bias=False)
        inits += norm(f"{pre}.input_layernorm", dt, bias=False)
        inits += norm(f"{pre}.post_attention_layernorm", dt, bias=False)
    return sorted(inits, key=lambda x: x.name)


def tiny_weights(spec: TinySpec = TinySpec()) -> dict[str, np.ndarray]:
    """All fixture tensors as float32 numpy arrays, keyed by the names of :func:`parameter_inits`.

    Trained (the default): read from :data:`TRAINED_WEIGHTS`, which must hold exactly those names
    and shapes. Random: one ``default_rng(spec.seed)`` is consumed in sorted-name order, one
    ``standard_normal`` call per tensor in float64; the float32 cast happens last, so every
    numpy/torch version gets the same bits.
    """
    if spec.weights == "trained":
        return _trained_weights(spec)
    rng = np.random.default_rng(spec.seed)
    out: dict[str, np.ndarray] = {}
    for p in parameter_inits(spec):
        draw = rng.standard_normal(size=p.shape, dtype=np.float64)
        out[p.name] = np.ascontiguousarray((p.mean + p.std * draw).astype(np.float32))
    return out


def _trained_weights(spec: TinySpec) -> dict[str, np.ndarray]:
    with safe_open(str(TRAINED_WEIGHTS), framework="np") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    expected = {p.name: p.shape for p in parameter_inits(spec)}
    found = {k: tuple(v.shape) for k, v in arrays.items()}
    if found != expected:
        raise ValueError(f"{TRAINED_WEIGHTS.name} was trained for the default TinySpec dims and does not fit "
                         f"this spec ({len(set(found) ^ set(expected))} names differ); use weights='random'")  # fmt: skip
    return {k: np.ascontiguousarray(arrays[k].astype(np.float32)) for k in sorted(arrays)}


def _to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v).copy()) for k, v in arrays.items()}


def clip_state_dict(
    spec: TinySpec = TinySpec(), weights: Mapping[str, np.ndarray] | None = None
) -> dict[str, torch.Tensor]:
    """``CLIPVisionModel`` state dict (``vision_model.*`` keys) as torch tensors."""
    w = tiny_weights(spec) if weights is None else weights
    return _to_torch({k: v for k, v in w.items() if k.startswith("vision_model.")})


def legacy_state_dict(
    spec: TinySpec = TinySpec(), weights: Mapping[str, np.ndarray] | None = None
) -> dict[str, torch.Tensor]:
    """liuhaotian ``LlavaLlamaForCausalLM`` state dict: LLM + ``model.mm_projector.{0,2}``, no tower."""
    w = tiny_weights(spec) if weights is None else weights
    return _to_torch({k: v for k, v in w.items() if not k.startswith("vision_model.")})


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows, *a.shape[1:]), dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


def hf_state_dict(
    spec: TinySpec = TinySpec(), weights: Mapping[str, np.ndarray] | None = None
) -> dict[str, torch.Tensor]:
    """llava-hf state dict with the key names of the hub checkpoints (pre-4.52 module layout).

    Newer transformers remap these on load (``language_model.model.*`` -> ``model.language_model.*``
    and so on); writing the hub names is what exercises that remapping.
    """
    w = tiny_weights(spec) if weights is None else weights
    out: dict[str, np.ndarray] = {}
    for k, v in w.items():
        if k.startswith("vision_model."):
            out[f"vision_tower.{k}"] = v
        elif k.startswith("model.mm_projector.0."):
            out["multi_modal_projector.linear_1." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.mm_projector.2."):
            out["multi_modal_projector.linear_2." + k.rsplit(".", 1)[1]] = v
        elif k == "model.embed_tokens.weight":
            out["language_model.model.embed_tokens.weight"] = _pad_rows(v, spec.hf_vocab_size)
        elif k == "lm_head.weight":
            out["language_model.lm_head.weight"] = _pad_rows(v, spec.hf_vocab_size)
        elif k.startswith("model."):
            out[f"language_model.{k}"] = v
        else:  # pragma: no cover - parameter_inits only makes the prefixes above
            raise KeyError(k)
    return _to_torch(out)


def save_state_dict(
    state: Mapping[str, torch.Tensor], directory: str | Path, fmt: SerializationFormat
) -> Path:
    """Write ``state`` as ``model.safetensors`` or ``pytorch_model.bin`` in ``directory``.

    One helper for both serializations so the two variants of a format differ only in the file.
    Tensors are made contiguous and unshared (safetensors refuses shared storage).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in sorted(state.items())}
    if fmt == "safetensors":
        path = directory / "model.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
    elif fmt == "bin":
        path = directory / "pytorch_model.bin"
        torch.save(tensors, str(path))
    else:
        raise ValueError(f"unknown serialization {fmt!r}; expected 'safetensors' or 'bin'")
    return path


# --------------------------------------------------------------------------------------------------
# Configs (plain dicts, written by hand so every transformers version writes the same bytes)


def clip_config(spec: TinySpec = TinySpec()) -> dict[str, Any]:
    """``config.json`` of the vision tower (quick_gelu like CLIP ViT-L/14)."""
    return {
        "architectures": ["CLIPVisionModel"],
        "attention_dropout": 0.0,
        "hidden_act": "quick_gelu",
        "hidden_size": spec.vision_hidden_size,
        "image_size": spec.image_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": spec.vision_intermediate_size,
        "layer_norm_eps": spec.vision_layer_norm_eps,
        "model_type": "clip_vision_model",
        "num_attention_heads": spec.vision_num_heads,
        "num_channels": 3,
        "num_hidden_layers": spec.vision_num_layers,
        "patch_size": spec.patch_size,
        "projection_dim": spec.vision_hidden_size,
        "torch_dtype": "float32",
    }


def image_processor_config(spec: TinySpec = TinySpec(), processor_class: str | None = None) -> dict[str, Any]:
    """``preprocessor_config.json`` for ``CLIPImageProcessor`` (CLIP-336's settings at ``image_size``)."""
    cfg: dict[str, Any] = {
        "crop_size": {"height": spec.image_size, "width": spec.image_size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"shortest_edge": spec.image_size},
    }
    if processor_class:
        cfg["processor_class"] = processor_class
    return cfg


def _llama_keys(spec: TinySpec, vocab_size: int, pad_token_id: int) -> dict[str, Any]:
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "hidden_act": "silu",
        "hidden_size": spec.text_hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.text_intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "num_attention_heads": spec.text_num_heads,
        "num_hidden_layers": spec.text_num_layers,
        "num_key_value_heads": spec.text_num_kv_heads,
        "pad_token_id": pad_token_id,
        "pretraining_tp": 1,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def legacy_config(spec: TinySpec, vision_tower: str | Path) -> dict[str, Any]:
    """liuhaotian ``config.json``: Llama keys plus the ``mm_*`` keys the legacy builder reads."""
    cfg = _llama_keys(spec, TEXT_VOCAB_SIZE, UNK_ID)  # llava-v1.5 pads with <unk> (id 0)
    cfg.update(
        {
            "architectures": ["LlavaLlamaForCausalLM"],
            "freeze_mm_mlp_adapter": False,
            "image_aspect_ratio": "pad",
            "mm_hidden_size": spec.vision_hidden_size,
            "mm_projector_type": spec.projector_type,
            "mm_use_im_patch_token": False,
            "mm_use_im_start_end": False,
            "mm_vision_select_feature": "patch",
            "mm_vision_select_layer": spec.vision_select_layer,
            "mm_vision_tower": str(vision_tower),
            "model_type": "llava_llama",
            "tokenizer_model_max_length": spec.max_position_embeddings,
            "tokenizer_padding_side": "right",
            "tune_mm_mlp_adapter": False,
            "unfreeze_mm_vision_tower": False,
            "use_mm_proj": True,
        }
    )
    return cfg


def hf_config(spec: TinySpec = TinySpec()) -> dict[str, Any]:
    """llava-hf ``config.json`` (``LlavaForConditionalGeneration``)."""
    vision = clip_config(spec)
    del vision["architectures"], vision["torch_dtype"]
    text = _llama_keys(spec, spec.hf_vocab_size, spec.pad_token_id)
    # llava-hf's text_config has no rope_scaling/pretraining_tp (transformers 5 warns on rope_scaling).
    del text["rope_scaling"], text["pretraining_tp"]
    text["architectures"] = ["LlamaForCausalLM"]
    text["model_type"] = "llama"
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_seq_length": spec.num_patches,
        "image_token_index": spec.image_token_id,
        "model_type": "llava",
        "multimodal_projector_bias": True,
        "pad_token_id": spec.pad_token_id,
        "projector_hidden_act": "gelu",
        "text_config": text,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vision_config": vision,
        "vision_feature_layer": spec.vision_select_layer,
        "vision_feature_select_strategy": "default",
        "vocab_size": spec.hf_vocab_size,
    }


def _generation_config(pad_token_id: int) -> dict[str, Any]:
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": pad_token_id}


# The LLaVA-1.5 ("v1") conversation format: "USER: <image>\n{question} ASSISTANT: {answer}</s>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ ' ' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------------
# Tokenizer files


def _added_token(content: str) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _tokenizer_files(spec: TinySpec, hf: bool) -> dict[str, Any]:
    """tokenizer.json / tokenizer_config.json / special_tokens_map.json contents for one format.

    ``legacy: false`` as in vicuna-7b-v1.5 / llava-v1.5-7b / llava-hf: no extra "▁" after special
    tokens, which is also what transformers 5's Llama tokenizer does (``Metaspace`` prepend "first").
    """
    tok_json = json.loads(TOKENIZER_JSON.read_text(encoding="utf-8"))
    if len(tok_json["model"]["vocab"]) != TEXT_VOCAB_SIZE:
        raise RuntimeError(
            f"{TOKENIZER_JSON} has {len(tok_json['model']['vocab'])} pieces, expected {TEXT_VOCAB_SIZE}"
        )
    decoder = {str(i): _added_token(t) for i, t in ((UNK_ID, "<unk>"), (BOS_ID, "<s>"), (EOS_ID, "</s>"))}
    special_map: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config: dict[str, Any] = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
    }
    if hf:
        for tid, content in ((spec.image_token_id, IMAGE_TOKEN), (spec.pad_token_id, PAD_TOKEN)):
            decoder[str(tid)] = _added_token(content)
            tok_json["added_tokens"].append({"id": tid, **_added_token(content)})
        config.update(
            {
                "model_max_length": spec.max_position_embeddings,
                "pad_token": PAD_TOKEN,
                "padding_side": "left",
                "processor_class": "LlavaProcessor",
            }
        )
        special_map["pad_token"] = PAD_TOKEN
    else:
        # llava's train.py sets pad_token = unk_token for v1 conversations and saves it.
        config.update(
            {"model_max_length": spec.max_position_embeddings, "pad_token": "<unk>", "padding_side": "right"}
        )
        special_map["pad_token"] = "<unk>"
    config["added_tokens_decoder"] = decoder
    files: dict[str, Any] = {"tokenizer_config.json": config, "special_tokens_map.json": special_map}
    if hf:  # liuhaotian checkpoints ship tokenizer.model alone
        files["tokenizer.json"] = json.dumps(tok_json, ensure_ascii=False, indent=2) + "\n"
    return files


def _write_json(path: Path, obj: Any) -> None:
    if isinstance(obj, str):
        text = obj
    else:
        text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")


def _write_tokenizer(directory: Path, spec: TinySpec, hf: bool) -> None:
    shutil.copyfile(TOKENIZER_MODEL, directory / "tokenizer.model")
    for name, content in _tokenizer_files(spec, hf).items():
        _write_json(directory / name, content)


# --------------------------------------------------------------------------------------------------
# Building


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_tiny_checkpoints(
    out_dir: str | Path,
    spec: TinySpec = TinySpec(),
    *,
    vision_tower_path: str | Path | None = None,
) -> dict[str, Path]:
    """Write the five fixture directories into ``out_dir``; return ``{dir name: path}``.

    ``vision_tower_path`` is what the legacy configs record as ``mm_vision_tower``; it defaults to
    the absolute path of ``out_dir/clip`` and only needs setting when the tree will be moved after
    building (as :func:`ensure_tiny_checkpoints` does). A ``tiny_manifest.json`` with the spec digest
    and file hashes is written last, marking the tree complete.
    """
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    tower = Path(vision_tower_path).absolute() if vision_tower_path is not None else out / CLIP_DIR
    weights = tiny_weights(spec)
    paths = {name: out / name for name in ALL_DIRS}
    for p in paths.values():
        p.mkdir(exist_ok=True)

    clip = paths[CLIP_DIR]
    _write_json(clip / "config.json", clip_config(spec))
    _write_json(clip / "preprocessor_config.json", image_processor_config(spec))
    save_state_dict(clip_state_dict(spec, weights), clip, "safetensors")

    legacy = legacy_state_dict(spec, weights)
    for name, fmt in ((LEGACY_BIN, "bin"), (LEGACY_SAFETENSORS, "safetensors")):
        d = paths[name]
        _write_json(d / "config.json", legacy_config(spec, tower))
        _write_json(d / "generation_config.json", _generation_config(UNK_ID))
        _write_tokenizer(d, spec, hf=False)
        save_state_dict(legacy, d, fmt)

    hf = hf_state_dict(spec, weights)
    for name, fmt in ((HF_SAFETENSORS, "safetensors"), (HF_BIN, "bin")):
        d = paths[name]
        _write_json(d / "config.json", hf_config(spec))
        _write_json(d / "generation_config.json", _generation_config(spec.pad_token_id))
        _write_json(d / "preprocessor_config.json", image_processor_config(spec, "LlavaProcessor"))
        # As on the hub today. transformers < 4.43 passes these keys to LlavaProcessor.__init__,
        # which does not take them: AutoProcessor raises TypeError there (a compat fix's job);
        # 4.43/4.44 drop them, 4.45+ use them to expand <image> to one token per feature.
        _write_json(
            d / "processor_config.json",
            {
                "image_token": IMAGE_TOKEN,
                "num_additional_image_tokens": 1,
                "patch_size": spec.patch_size,
                "processor_class": "LlavaProcessor",
                "vision_feature_select_strategy": "default",
            },
        )
        _write_json(d / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
        _write_tokenizer(d, spec, hf=True)
        save_state_dict(hf, d, fmt)

    files = {}
    for f in sorted(out.rglob("*")):
        if f.is_file() and f.name != MANIFEST and f.parent.name in ALL_DIRS and f.parent.parent == out:
            # pickle bytes of .bin files may differ between torch versions; only their tensors must not.
            files[f.relative_to(out).as_posix()] = None if f.suffix == ".bin" else _sha256(f)
    _write_json(out / MANIFEST, {"digest": spec.digest(), "files": files, "fixture_version": FIXTURE_VERSION})
    return paths


def _is_complete(root: Path, spec: TinySpec) -> bool:
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("digest") != spec.digest():
        return False
    for rel, sha in manifest.get("files", {}).items():
        f = root / rel
        if not f.is_file() or (sha is not None and _sha256(f) != sha):
            return False
    return True


def default_cache_root() -> Path:
    """``$DYMU_CACHE`` if set, else ``~/.cache/dymu``."""
    env = os.environ.get("DYMU_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dymu"


def ensure_tiny_checkpoints(
    cache_dir: str | Path | None = None, spec: TinySpec = TinySpec()
) -> dict[str, Path]:
    """Return the fixture paths under ``<cache_dir>/tiny-<spec digest>/``, building them once.

    ``cache_dir`` defaults to :func:`default_cache_root`. The tree is built in a temporary sibling
    directory and renamed into place, so a concurrent or interrupted build never leaves a half-written
    tree that looks complete; an existing tree is reused only if its manifest matches.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    final = (root / f"tiny-{spec.digest()}").absolute()
    if not _is_complete(final, spec):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
        try:
            build_tiny_checkpoints(tmp, spec, vision_tower_path=final / CLIP_DIR)
            tmp.chmod(0o755)  # mkdtemp makes it 0700; a shared cache should stay readable
            if final.exists() and not _is_complete(final, spec):
                shutil.rmtree(final)  # stale or partial leftover
            try:
                os.rename(tmp, final)
            except OSError:
                if not _is_complete(final, spec):  # lost a race to a build that is also broken
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return {name: final / name for name in ALL_DIRS}


def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Hash of a state dict's names, dtypes, shapes and bytes: equal iff the tensors are equal."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def tree_fingerprint(root: str | Path) -> dict[str, str]:
    """sha256 of every fixture file under ``root``; ``.bin`` files hash their tensors instead.

    Why: two builds (or two torch versions) must agree byte for byte except for pickle framing,
    which torch does not promise to keep stable; this makes that comparison one dict equality.
    """
    root = Path(root)
    out = {}
    for name in ALL_DIRS:
        for f in sorted((root / name).iterdir()):
            if not f.is_file():
                continue
            if f.suffix == ".bin":
                out[f"{name}/{f.name}"] = "tensors:" + tensors_sha256(
                    torch.load(f, map_location="cpu", weights_only=True)
                )
            else:
                out[f"{name}/{f.name}"] = _sha256(f)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m dymu.testing.tiny OUT_DIR``: build the fixture and print its fingerprint as JSON."""
    parser = argparse.ArgumentParser(prog="python -m dymu.testing.tiny", description=main.__doc__)
    parser.add_argument("out_dir", help="directory to build into (its absolute path lands in configs)")
    args = parser.parse_args(argv)
    build_tiny_checkpoints(args.out_dir)
    print(json.dumps(tree_fingerprint(args.out_dir), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


NOBOS = "llava-v1.5-tiny-nobos"


def nobos_variant(paths: Mapping[str, Path] | None = None) -> Path:
    """The liuhaotian safetensors fixture with `add_bos_token` / `add_eos_token` removed from its
    tokenizer_config.json, as many LLaMA-derived checkpoints ship (built once next to the fixture).
    It must behave exactly like the original: same ids, same outputs."""
    paths = paths or ensure_tiny_checkpoints()
    src = paths[LEGACY_SAFETENSORS]
    dst = src.parent / NOBOS
    if not (dst / "tokenizer_config.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{NOBOS}-", dir=src.parent))
        shutil.copytree(src, tmp / NOBOS)
        config_file = tmp / NOBOS / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        for key in ("add_bos_token", "add_eos_token"):
            config.pop(key, None)
        _write_json(config_file, config)
        try:
            os.rename(tmp / NOBOS, dst)
        except OSError:
            if not (dst / "tokenizer_config.json").is_file():  # lost a race to a build that also failed
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dst
