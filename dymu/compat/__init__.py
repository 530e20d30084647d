"""Patch sets: named, version-ranged fixes, each with an apply(), a verify() that can fail,
and a negative control that reproduces the documented error with the fix disabled.

The data (ranges, error signatures, removal notes) lives in `patches/fixes.toml`
(installed as `dymu.patchdata`); the code for each fix is registered here by name.
Like scikit-learn's `utils/fixes.py`, every version-dependent workaround sits in one place.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ..versions import installed

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PACKAGES = ("torch", "transformers", "llava-torch")


@dataclass
class Fix:
    """One named fix: data from patches/fixes.toml plus its registered code."""

    name: str
    summary: str
    ranges: dict[str, SpecifierSet]
    error: str
    remove_when: str
    apply: Callable[[], None] = lambda: None
    verify: Callable[[], str] | None = None
    negative: Callable[[], None] | None = None
    requires: tuple[str, ...] = field(default_factory=tuple)

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


_IMPLS: dict[str, dict] = {}


def register(name: str, *, verify: Callable[[], str], negative: Callable[[], None] | None = None,
             apply: Callable[[], None] | None = None, requires: tuple[str, ...] = ()) -> None:  # fmt: skip
    """Attach code to a fix named in patches/fixes.toml."""
    _IMPLS[name] = {"verify": verify, "negative": negative, "apply": apply, "requires": requires}


def _data() -> dict:
    try:
        text = resources.files("dymu.patchdata").joinpath("fixes.toml").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):  # running from a source tree without install
        from pathlib import Path

        text = (Path(__file__).resolve().parents[2] / "patches" / "fixes.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


@functools.cache
def all_fixes() -> dict[str, Fix]:
    """Every fix in the patch data, with its code attached."""
    from . import core, legacy  # noqa: F401 - registers the implementations

    fixes = {}
    for name, entry in _data().items():
        impl = _IMPLS.get(name)
        if impl is None:
            raise RuntimeError(f"patches/fixes.toml names fix {name!r} but no code registers it")
        fixes[name] = Fix(
            name=name,
            summary=entry["summary"],
            ranges={p: SpecifierSet(entry[p]) for p in PACKAGES if p in entry},
            error=entry["error"],
            remove_when=entry["remove_when"],
            apply=impl["apply"] or (lambda: None),
            verify=impl["verify"],
            negative=impl["negative"],
            requires=impl["requires"],
        )
    return fixes


DISABLE_ENV = "DYMU_DISABLE_FIXES"


def disabled(name: str | None = None) -> bool | set[str]:
    """Fixes switched off with DYMU_DISABLE_FIXES=a,b: the matrix's broken-cell check (a cell that
    needs the fix must then fail with its documented error). With `name`, whether that one is."""
    names = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
    return name in names if name is not None else names


def patch_set() -> list[Fix]:
    """The fixes the installed versions need."""
    return [fix for fix in all_fixes().values() if fix.needed()[0]]


def apply_patch_set() -> list[str]:
    """Apply every needed fix that is not disabled (idempotent); returns their names."""
    applied = []
    for fix in patch_set():
        if disabled(fix.name):
            continue
        fix.apply()
        applied.append(fix.name)
    return applied


def check(fix: Fix, negative: bool = True) -> dict[str, str]:
    """Run verify() (after apply()) and, where the fix is needed, the negative control."""
    is_needed, why = fix.needed()
    result = {"fix": fix.name, "needed": "yes" if is_needed else "no", "why": why}
    missing = [p for p in fix.requires if installed(p) is None]
    if missing:
        result.update(verify="n.a.", detail=f"needs {', '.join(missing)}", negative="n.a.")
        return result
    if disabled(fix.name):
        result["disabled"] = f"by {DISABLE_ENV}"
    try:
        if not disabled(fix.name):
            fix.apply()
        result.update(verify="held", detail=fix.verify() if fix.verify else "")
    except Exception as err:
        result.update(
            verify="failed",
            detail=f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}",
        )
    if not (negative and is_needed and fix.negative):
        result["negative"] = "not run" if not is_needed else "none"
        return result
    try:
        fix.negative()
        result["negative"] = "did not fail"
    except Exception as err:
        text = f"{type(err).__name__}: {err}"
        result["negative"] = "failed as documented" if re.search(fix.error, text) else "failed differently"
        result["negative_error"] = text.splitlines()[0][:200]
    return result
