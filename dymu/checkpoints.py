"""Checkpoint directories: find the weights, and the `.bin` versus safetensors question.

transformers >= 4.52 refuses to `torch.load` a `.bin` checkpoint on torch < 2.6
(CVE-2025-32434). There a `.bin`-only directory gets a clear error naming the fix:
`dymu convert DIR OUT`, which rewrites the weights as safetensors (reading the `.bin`
with `weights_only=True`, so nothing but tensors is ever unpickled).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .compat.shims import bin_blocked, safe_load
from .errors import DymuError
from .versions import installed

BIN_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SAFE_NAMES = ("model.safetensors", "model.safetensors.index.json")


def weight_format(path: str | Path) -> str:
    """'safetensors' or 'bin' for a checkpoint directory; one-line error when it has neither."""
    path = Path(path)
    if any((path / n).is_file() for n in SAFE_NAMES):
        return "safetensors"
    if any((path / n).is_file() for n in BIN_NAMES):
        return "bin"
    raise DymuError(
        f"{path}: no model weights (model.safetensors or pytorch_model.bin); is this the right directory?"
    )


def check_weights(path: str | Path) -> str:
    """The weight format of `path`, after cheap checks of every weight file (headers only), so a
    truncated, empty or foreign file is one clear line before any model is built; `.bin` is
    refused up front where transformers would."""
    path = Path(path)
    fmt = weight_format(path)
    if fmt == "bin" and bin_blocked():
        raise DymuError(
            f"{path}: has only .bin weights, which transformers {installed('transformers')} refuses on torch "
            f"{installed('torch')} (needs torch >= 2.6); convert them: `dymu convert {path} {path}-safetensors`"
        )
    for file in weight_files(path, fmt):
        if fmt == "safetensors":
            _check_safetensors(file)
        elif not zipfile.is_zipfile(file):  # torch.save has written zip archives since torch 1.6
            raise DymuError(
                f"{file}: not a torch checkpoint (truncated or another format); download it again"
            )
    return fmt


def weight_files(path: Path, fmt: str) -> list[Path]:
    """The weight files of a checkpoint directory: the single file, or every shard its index names
    (each must stay inside the directory and exist)."""
    index = path / (
        "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    )
    if not index.is_file():
        return [path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise DymuError(
            f"{index}: not a shard index ({type(err).__name__}: {err}); download it again"
        ) from None
    root = path.resolve()
    files = []
    for shard in shards:
        file = (path / str(shard)).resolve()
        if not isinstance(shard, str) or root not in file.parents:
            raise DymuError(f"{index}: shard {shard!r} points outside the checkpoint directory; refusing it")
        if not file.is_file():
            raise DymuError(f"{index}: names shard {shard!r}, which is missing; download it again")
        files.append(file)
    return files


def _check_safetensors(file: Path) -> None:
    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error types, and OSError for short files
        raise DymuError(
            f"{file}: not a readable safetensors file ({type(err).__name__}: {str(err)[:120]}); download it again"
        ) from None


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors checkpoint (headers only; {} for .bin)."""
    if weight_format(path) != "safetensors":
        return {}
    shapes = {}
    for file in weight_files(path, "safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def convert_to_safetensors(src: str | Path, dst: str | Path) -> Path:
    """Copy a checkpoint directory, rewriting `.bin` weights as one `model.safetensors`."""
    src, dst = Path(src), Path(dst)
    if weight_format(src) != "bin":
        raise DymuError(f"{src}: already has safetensors weights; nothing to convert")
    if dst.exists():
        raise DymuError(f"{dst}: already exists; choose a new output directory")
    state: dict[str, torch.Tensor] = {}
    for shard in weight_files(src, "bin"):
        try:
            part = safe_load(shard, map_location="cpu")
        except Exception as err:
            raise DymuError(
                f"{shard}: cannot be read as plain tensors ({type(err).__name__}); refusing it"
            ) from None
        state.update({k: v.contiguous() for k, v in part.items()})
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(
        src, tmp, ignore=shutil.ignore_patterns("pytorch_model*.bin", "pytorch_model.bin.index.json")
    )
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(dst)
    return dst


def check_sizes(path: Path, hidden_size: int | None) -> None:
    """The config's text width must match the weights' embedding width (safetensors headers), so a
    config from another model never makes us allocate a model the weights do not confirm."""
    if hidden_size is None:
        return
    shapes = tensor_shapes(path)
    embed = [
        shape for key, shape in shapes.items() if key.endswith("embed_tokens.weight") and len(shape) == 2
    ]
    if shapes and not embed:
        raise DymuError(f"{path}: the weights hold no `embed_tokens.weight`; is this a LLaVA-1.5 checkpoint?")
    if embed and embed[0][1] != hidden_size:
        raise DymuError(f"{path}: config.json says hidden size {hidden_size} but the weights' embeddings are "
                        f"{embed[0][1]} wide; the config does not belong to these weights")  # fmt: skip
