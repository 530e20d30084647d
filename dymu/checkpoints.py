"""Checkpoint directories: find the weights, and the `.bin` versus safetensors question.

transformers >= 4.52 refuses to `torch.load` a `.bin` checkpoint on torch < 2.6
(CVE-2025-32434). There a `.bin`-only directory gets a clear error naming the fix:
`dymu convert DIR OUT`, which rewrites the weights as safetensors (reading the `.bin`
with `weights_only=True`, so nothing but tensors is ever unpickled).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
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
    """The weight format of `path`, refusing `.bin` up front where transformers would."""
    fmt = weight_format(path)
    if fmt == "bin" and bin_blocked():
        raise DymuError(
            f"{path}: has only .bin weights, which transformers {installed('transformers')} refuses on torch "
            f"{installed('torch')} (needs torch >= 2.6); convert them: `dymu convert {path} {path}-safetensors`"
        )
    return fmt


def _bin_files(path: Path) -> list[Path]:
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    return [path / "pytorch_model.bin"]


def convert_to_safetensors(src: str | Path, dst: str | Path) -> Path:
    """Copy a checkpoint directory, rewriting `.bin` weights as one `model.safetensors`."""
    src, dst = Path(src), Path(dst)
    if weight_format(src) != "bin":
        raise DymuError(f"{src}: already has safetensors weights; nothing to convert")
    if dst.exists():
        raise DymuError(f"{dst}: already exists; choose a new output directory")
    state: dict[str, torch.Tensor] = {}
    for shard in _bin_files(src):
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
