"""Matrix cells from envs/cells.toml, with pairings below transformers' torch floor rejected.

Standard library only: the noxfile loads this file by path, before any cell env exists.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# transformers release -> minimum torch at run time (../shared/COMPAT.md, "runtime floors"), plus
# 4.56 -> 2.2, found by the full set: 4.56.2 on torch 2.1.2 fails at import
# (`torch.utils._pytree` has no `register_pytree_node` before torch 2.2)
TORCH_FLOORS = (
    ((5, 20), (2, 6)),
    ((5, 15), (2, 5)),
    ((5, 1), (2, 4)),
    ((5, 0), (2, 2)),
    ((4, 56), (2, 2)),
    ((4, 52), (2, 1)),
)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit())


def torch_floor(transformers: str) -> tuple[int, ...] | None:
    have = _release(transformers)[:2]
    for since, floor in TORCH_FLOORS:
        if have >= since:
            return floor
    return None


def validate(name: str, cell: dict[str, Any]) -> None:
    """Raise ValueError for an impossible pairing or a malformed cell, saying why."""
    missing = [key for key in ("python", "torch", "transformers") if not isinstance(cell.get(key), str)]
    if missing:
        raise ValueError(
            f'cell {name!r}: missing {", ".join(missing)} (quote names with dots: [cells."a.b"])'
        )
    floor = torch_floor(cell["transformers"])
    if floor and _release(cell["torch"])[:2] < floor:
        raise ValueError(
            f"cell {name!r}: transformers {cell['transformers']} needs torch >= {'.'.join(map(str, floor))}, "
            f"got {cell['torch']}"
        )
    if _release(cell["torch"])[:2] < (2, 3) and not any(
        c.startswith("numpy<2") for c in cell.get("companions", [])
    ):
        raise ValueError(f"cell {name!r}: torch {cell['torch']} needs numpy<2 in companions")


def image_for(name: str, cell: dict[str, Any], images: dict[str, str]) -> str:
    """The cell's CUDA base image for the Docker backend: its own `image`, else [images] by torch."""
    if isinstance(cell.get("image"), str):
        return cell["image"]
    minor = ".".join(cell["torch"].split("+")[0].split(".")[:2])
    if minor not in images:
        raise ValueError(
            f"cell {name!r}: no CUDA base image for torch {minor}: add it to [images] or set `image`"
        )
    return images[minor]


def load(path: Path) -> dict[str, Any]:
    """The cells (each with its resolved `image`) and sets; ValueError names the bad entry."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    for name, cell in data["cells"].items():
        validate(name, cell)
        cell["image"] = image_for(name, cell, data.get("images", {}))
    for set_name, members in data["sets"].items():
        unknown = [m for m in members if m not in data["cells"]]
        if unknown:
            raise ValueError(f"set {set_name!r} names unknown cells {unknown}")
    return data
