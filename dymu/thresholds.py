"""Per-layer merge thresholds: the three file formats (docs/algorithm.md section 2).

- the official DyMU `.pth`: `torch.save({"name", "state_dict"})` of an open_clip model,
  thresholds at `[module.]visual.transformer.resblocks.{i}.threshold` (0-dim, often
  bf16); loaded with `weights_only=True`, never unpickled otherwise;
- ours: safetensors with a float32 `thresholds` (L,) tensor and string metadata;
- a JSON list of floats (or `{"thresholds": [...]}`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import write_atomic, write_text_atomic
from .errors import DymuError

_OFFICIAL_KEY = re.compile(r"^(?:module\.)?visual\.transformer\.resblocks\.(\d+)\.threshold$")
_FIX = "re-export it with `dymu calibrate` (safetensors) or pass a JSON list of per-layer floats"


def _from_official(path: Path) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # whatever torch.load raises (KeyError for text, UnpicklingError, ...): refuse
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DymuError(
            f"{path}: refused to load: not a plain tensor checkpoint ({first[:160]}); {_FIX}"
        ) from None
    if isinstance(obj, torch.Tensor):
        return obj
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise DymuError(f"{path}: expected a dict with a 'state_dict' of thresholds; {_FIX}")
    if isinstance(state.get("thresholds"), torch.Tensor):
        return state["thresholds"]
    found = {}
    for key, value in state.items():
        m = _OFFICIAL_KEY.match(str(key))
        if m and isinstance(value, torch.Tensor):
            found[int(m.group(1))] = value
    if not found:
        raise DymuError(f"{path}: no 'visual.transformer.resblocks.<i>.threshold' entries; {_FIX}")
    if sorted(found) != list(range(len(found))):
        raise DymuError(f"{path}: threshold layers {sorted(found)} are not 0..{len(found) - 1}; {_FIX}")
    for i, value in found.items():
        if value.numel() != 1:
            raise DymuError(
                f"{path}: layer {i}'s threshold has shape {tuple(value.shape)}, not one number; {_FIX}"
            )
        if not value.is_floating_point():
            raise DymuError(f"{path}: layer {i}'s threshold is {value.dtype}, not a float; {_FIX}")
    return torch.stack([found[i].float().reshape(()) for i in range(len(found))])


def _from_safetensors(path: Path) -> torch.Tensor:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DymuError(f"{path}: not a readable safetensors file ({err}); {_FIX}") from None
    if "thresholds" not in tensors:
        raise DymuError(f"{path}: has no 'thresholds' tensor; {_FIX}")
    return tensors["thresholds"]


def _from_json(path: Path) -> torch.Tensor:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DymuError(f"{path}: malformed JSON ({err}); {_FIX}") from None
    if isinstance(data, dict):
        data = data.get("thresholds")
    if not isinstance(data, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in data
    ):
        raise DymuError(f"{path}: expected a JSON list of numbers; {_FIX}")
    return torch.tensor([float(v) for v in data], dtype=torch.float64)


def load_thresholds(path: str | Path, num_layers: int | None = None) -> torch.Tensor:
    """Read per-layer thresholds from any supported file as a float32 (L,) tensor.

    +inf means "never merge at this layer". NaN, an empty list, or a length other
    than `num_layers` (when given) is refused with a one-line error naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DymuError(f"{path}: thresholds file not found; pass an existing .pth/.safetensors/.json file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tau = _from_safetensors(path)
    elif suffix == ".json":
        tau = _from_json(path)
    else:
        tau = _from_official(path)
    return validate_thresholds(tau, str(path), num_layers)


def validate_thresholds(tau: torch.Tensor, source: str, num_layers: int | None = None) -> torch.Tensor:
    """The one check every thresholds source passes: a 1-D float tensor, one value per tower block,
    each a cosine similarity in [-1, 1] or +inf ("never merge at this block"). Returns float32."""
    if not isinstance(tau, torch.Tensor):
        raise DymuError(
            f"{source}: thresholds must be a tensor or a list of numbers, got {type(tau).__name__}"
        )
    if not tau.is_floating_point():
        raise DymuError(f"{source}: thresholds are {tau.dtype}, not floats; {_FIX}")
    if tau.dim() != 1:
        raise DymuError(
            f"{source}: thresholds have shape {tuple(tau.shape)}, not one number per layer; {_FIX}"
        )
    tau = tau.detach().float().cpu()
    if tau.numel() == 0:
        raise DymuError(f"{source}: contains no thresholds; {_FIX}")
    bad = [i for i, v in enumerate(tau.tolist()) if not (v == math.inf or -1.0 <= v <= 1.0)]
    if bad:
        raise DymuError(f"{source}: thresholds at layers {bad} are outside [-1, 1] (and not +inf, 'never merge'): "
                        f"{[tau[i].item() for i in bad][:4]}; {_FIX}")  # fmt: skip
    if num_layers is not None and tau.numel() != num_layers:
        raise DymuError(
            f"{source}: has {tau.numel()} thresholds but the vision tower has {num_layers} layers; "
            "use a file calibrated for this tower"
        )
    return tau


def save_thresholds(path: str | Path, thresholds: torch.Tensor, **metadata: object) -> Path:
    """Write thresholds atomically: safetensors with string metadata, or JSON for a `.json` path."""
    path = Path(path)
    tau = thresholds.detach().float().reshape(-1).cpu().contiguous()
    if path.suffix.lower() == ".json":
        values = tau.tolist()
        if not all(math.isfinite(v) for v in values):
            raise DymuError(f"{path}: JSON cannot hold infinite thresholds; save as .safetensors instead")
        return write_text_atomic(path, json.dumps({"thresholds": values, **metadata}, indent=2) + "\n")

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return write_atomic(path, lambda tmp: save_file({"thresholds": tau}, str(tmp), metadata=meta))


def threshold_metadata(path: str | Path) -> dict[str, str]:
    """The metadata stored in one of our safetensors thresholds files."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
