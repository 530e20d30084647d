"""Patch sets: named, version-ranged fixes (sklearn's `utils/fixes.py` idea).

- `registry`: the data from `patches/fixes.toml` (ranges, documented errors, removal notes);
- `shims` and `legacy`: the runtime code, where every version branch lives, each reading
  its fix's registration;
- `checks` (top floor, not imported here): verify() and the negative control per fix.
"""

from .registry import Fix, active, disable, disabled, fixes, needed

__all__ = ["Fix", "active", "disable", "disabled", "fixes", "needed"]
