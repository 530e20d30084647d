"""The code digest a cell result is valid for, and the golden file's place (standard library only)."""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN_FILE = ROOT / "tests" / "golden" / "reference.json"


def code_digest(root: Path | None = None) -> str:
    """sha256 over the library, the patch data and the golden file: a result is fresh only for these."""
    root = root or ROOT
    digest = hashlib.sha256()
    files = sorted([*(root / "dymu").rglob("*.py"), root / "patches" / "fixes.toml",
                    root / "tests" / "golden" / "reference.json"])  # fmt: skip
    for path in files:
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
