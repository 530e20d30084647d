"""Matrix cells from envs/cells.toml: defaults merged in, keys typed, pairings below
transformers' torch floor rejected, and what each backend needs derived in one place.

Standard library only: the noxfile imports it in nox's own interpreter, before any cell env exists.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
CELLS_FILE = ROOT / "envs" / "cells.toml"
# key -> type; anything else in a cell is a typo and is refused
KEYS: dict[str, type | tuple[type, ...]] = {
    "python": str, "torch": str, "transformers": str, "companions": list, "legacy": list, "why": str,
    "image": str, "base_digest": str, "expect": str, "disable_fixes": list, "self_kill": bool,
    "expect_gpu": bool,  # the cell must see CUDA (`nox -s matrix -- --expect-gpu` sets it for a run)
}  # fmt: skip
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
EXPECT = ("pass", "crash", "timeout", "oom", "install-failure", "stage-failure", "stage-failure/known",
          "gpu-missing", "driver-too-old")  # fmt: skip


def release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit())


def torch_floor(transformers: str, floors: dict[str, str]) -> tuple[int, ...] | None:
    """The minimum torch for a transformers release ([torch_floors]: the newest entry it reaches)."""
    have = release(transformers)[:2]
    reached = [(release(since), release(floor)) for since, floor in floors.items() if have >= release(since)]
    return max(reached)[1] if reached else None


SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate(name: str, cell: dict[str, Any], floors: dict[str, str]) -> None:
    """Raise ValueError for an impossible pairing or a malformed cell, saying why."""
    if not SAFE_NAME.match(name) or ".." in name:
        raise ValueError(
            f"cell {name!r}: names are letters, digits, '.', '_' and '-' (they become file names)"
        )
    missing = [key for key in ("python", "torch", "transformers") if not isinstance(cell.get(key), str)]
    if missing:
        raise ValueError(
            f'cell {name!r}: missing {", ".join(missing)} (quote names with dots: [cells."a.b"])'
        )
    for key, value in cell.items():
        if key not in KEYS:
            raise ValueError(f"cell {name!r}: unknown key {key!r}; known: {', '.join(sorted(KEYS))}")
        if not isinstance(value, KEYS[key]):
            raise ValueError(f"cell {name!r}: {key} must be a {KEYS[key].__name__}, got {value!r}")
    if "base_digest" in cell and "image" not in cell:
        raise ValueError(
            f"cell {name!r}: base_digest belongs to an image; set `image` too, or put it in [images]"
        )
    if "base_digest" in cell and not DIGEST.match(cell["base_digest"]):
        raise ValueError(
            f"cell {name!r}: base_digest {cell['base_digest']!r} is not sha256:<64 lowercase hex digits>"
        )
    if cell.get("expect", "pass") not in EXPECT:
        raise ValueError(f"cell {name!r}: expect {cell['expect']!r} is not one of {', '.join(EXPECT)}")
    floor = torch_floor(cell["transformers"], floors)
    if floor and release(cell["torch"])[:2] < floor:
        raise ValueError(
            f"cell {name!r}: transformers {cell['transformers']} needs torch >= {'.'.join(map(str, floor))}, "
            f"got {cell['torch']}"
        )
    if release(cell["torch"])[:2] < (2, 3) and not any(
        c.startswith("numpy<2") for c in cell.get("companions", [])
    ):
        raise ValueError(f"cell {name!r}: torch {cell['torch']} needs numpy<2 in companions")


def image_for(name: str, cell: dict[str, Any], images: dict[str, Any]) -> tuple[str, str | None]:
    """The cell's CUDA base image for the Docker backend, (tag, digest or None): its own `image`
    (and `base_digest`), else [images] by torch release."""
    if isinstance(cell.get("image"), str):
        return cell["image"], cell.get("base_digest")
    minor = ".".join(cell["torch"].split("+")[0].split(".")[:2])
    if minor not in images:
        raise ValueError(
            f"cell {name!r}: no CUDA base image for torch {minor}: add it to [images] or set `image`"
        )
    entry = images[minor]
    if isinstance(entry, str):
        return entry, None
    unknown = set(entry) - {"tag", "base_digest"} if isinstance(entry, dict) else {"(not a table)"}
    if unknown or not isinstance(entry.get("tag"), str):
        raise ValueError(f'[images] "{minor}": give a tag string or {{tag = "...", base_digest = "sha256:..."}}'
                         f"{'; unknown keys: ' + ', '.join(sorted(unknown)) if unknown else ''}")  # fmt: skip
    digest = entry.get("base_digest")
    if digest is not None and not (isinstance(digest, str) and DIGEST.match(digest)):
        raise ValueError(
            f'[images] "{minor}": base_digest {digest!r} is not sha256:<64 lowercase hex digits>'
        )
    return entry["tag"], digest


def image_ref(cell: dict[str, Any]) -> str:
    """What the Docker backend builds FROM: `tag@digest` where the digest is recorded, else the tag
    (a tag can move; a digest cannot, but it can only be read on a host that can pull)."""
    return f"{cell['image']}@{cell['base_digest']}" if cell.get("base_digest") else cell["image"]


def _merged(defaults: dict[str, Any], cell: dict[str, Any]) -> dict[str, Any]:
    out = {**defaults, **cell}
    out["companions"] = [*defaults.get("companions", []), *cell.get("companions", [])]
    return out


def load(path: Path = CELLS_FILE) -> dict[str, Any]:
    """The cells (defaults merged, each with its resolved `image`), sets, images, floors and GPU cells;
    ValueError names the bad entry."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML ({err})") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None
    floors = data.get("torch_floors", {})
    data["cells"] = {name: _merged(data.get("defaults", {}), cell) for name, cell in data["cells"].items()}
    for name, cell in data["cells"].items():
        validate(name, cell, floors)
        cell["image"], digest = image_for(name, cell, data.get("images", {}))
        if digest:
            cell["base_digest"] = digest
    for set_name, members in data["sets"].items():
        unknown = [m for m in members if m not in data["cells"]]
        if unknown:
            raise ValueError(f"set {set_name!r} names unknown cells {unknown}")
    return data


def requirements(cell: dict[str, Any]) -> list[str]:
    """Pinned torch/transformers plus the companion pins (every backend installs exactly these)."""
    return [f"torch=={cell['torch']}", f"transformers=={cell['transformers']}", *cell.get("companions", [])]


def results_dir(root: Path, update_reports: bool = False) -> Path:
    """Where a test run's cell results go: `.nox/reports/cells` (ignored by git), so running the
    tests leaves the checkout clean; `reports/cells` (committed) only when asked to update them."""
    return root / ("reports" if update_reports else ".nox/reports") / "cells"


def runner_args(name: str, cell: dict[str, Any], out: str, backend: str) -> list[str]:
    """The cell runner's arguments, fault injection included (`python -m dymu.matrix.runner ...`)."""
    args = ["--cell", name, "--out", out, "--backend", backend]
    if cell.get("disable_fixes"):
        args += ["--disable-fixes", ",".join(cell["disable_fixes"])]
    if cell.get("self_kill"):
        args.append("--self-kill")
    if cell.get("expect_gpu"):
        args.append("--expect-gpu")
    return args


def main(argv: list[str]) -> int:
    """`python -m dymu.matrix.cells gpu|latest|SET`: print what scripts need, one item per line."""
    data = load()
    what = argv[0] if argv else ""
    if what == "gpu":
        print("\n".join(data["gpu"]["transformers"]))
    elif what in data["sets"]:
        print("\n".join(data["sets"][what]))
    else:
        print(f"usage: python -m dymu.matrix.cells gpu|{'|'.join(data['sets'])}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
