"""Strict JSON out: non-finite floats become null (JSON has no NaN or Infinity, and strict parsers,
`JSON.parse` among them, reject them). Every `--json` output and report goes through here."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """`obj` with every NaN / +-inf float (at any depth) replaced by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text (raises if anything non-finite slipped through)."""
    return json.dumps(finite(obj), indent=indent, allow_nan=False, ensure_ascii=False)
