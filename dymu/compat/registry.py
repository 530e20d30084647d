"""The patch-set data: every fix's version ranges, documented error and removal note, read
from `patches/fixes.toml` (installed as `dymu.patchdata`), the only place a version boundary
is written. Runtime shims ask `active(name)`; the matrix switches fixes off with `disable`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..errors import DymuError
from ..versions import installed

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PACKAGES = ("torch", "transformers", "llava-torch")
SOURCE_TREE_DATA = Path(__file__).resolve().parents[2] / "patches" / "fixes.toml"


@dataclass(frozen=True)
class Fix:
    """One named fix as the patch data describes it."""

    name: str
    summary: str
    ranges: dict[str, SpecifierSet]
    error: str
    remove_when: str

    def needed(self, versions: dict[str, Version | None] | None = None) -> tuple[bool, str]:
        """Whether the installed (or given) versions fall in every range, and why."""
        versions = versions if versions is not None else {p: installed(p) for p in PACKAGES}
        for package, spec in self.ranges.items():
            have = versions.get(package)
            if have is None:
                return False, f"{package} not installed"
            if str(spec) and not spec.contains(Version(have.base_version), prereleases=True):
                return False, f"{package} {have} outside {spec}"
        return True, ", ".join(f"{p} {versions.get(p)} in {s or 'any'}" for p, s in self.ranges.items())


def _text() -> str:
    """The source tree's file when running from one (so an edit counts at once), else the wheel's."""
    if SOURCE_TREE_DATA.is_file():
        return SOURCE_TREE_DATA.read_text(encoding="utf-8")
    return resources.files("dymu.patchdata").joinpath("fixes.toml").read_text(encoding="utf-8")


@functools.cache
def fixes() -> dict[str, Fix]:
    """Every fix in the patch data, by name."""
    return {
        name: Fix(
            name,
            entry["summary"],
            {p: SpecifierSet(entry[p]) for p in PACKAGES if p in entry},
            entry["error"],
            entry["remove_when"],
        )
        for name, entry in tomllib.loads(_text()).items()
    }


@functools.cache
def needed(name: str) -> bool:
    """Whether the installed versions need fix `name`."""
    return fixes()[name].needed()[0]


_disabled: set[str] = set()


def disable(names: Iterable[str]) -> None:
    """Switch fixes off for this process: the matrix's broken cells (a cell that needs one must
    then fail with its documented error). An unknown name is refused, so a typo cannot make
    that check pass vacuously."""
    names = {n.strip() for n in names if n.strip()}
    unknown = sorted(names - set(fixes()))
    if unknown:
        raise DymuError(f"unknown fixes {unknown}; known: {', '.join(sorted(fixes()))}")
    _disabled.clear()
    _disabled.update(names)


def disabled() -> frozenset[str]:
    return frozenset(_disabled)


def active(name: str) -> bool:
    """Whether the runtime takes fix `name`'s path: needed here and not switched off."""
    return needed(name) and name not in _disabled
