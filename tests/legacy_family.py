"""Shared by the tests that run both checkpoint families: the embedded model's directory per
family, and the skip for cells without the legacy package."""

from __future__ import annotations

import pytest

from dymu.testing import tiny
from dymu.versions import installed

FAMILY_DIRS = {"hf": tiny.HF_SAFETENSORS, "legacy": tiny.LEGACY_SAFETENSORS}


def skip_without_legacy(family: str) -> None:
    if family == "legacy" and installed("llava-torch") is None:
        pytest.skip("llava-torch not installed (nox cells install it --no-deps)")
