"""Installed versions, parsed once, for version-keyed behaviour."""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any

from packaging.version import Version


@functools.cache
def installed(package: str) -> Version | None:
    """The installed version of `package`, or None."""
    try:
        return Version(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None


def transformers_at_least(version: str) -> bool:
    """True when the installed transformers is >= `version`."""
    have = installed("transformers")
    return have is not None and have.release >= Version(version).release


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """`from_pretrained` dtype keyword: `dtype=` from transformers 4.56, `torch_dtype=` before.

    Remove the `torch_dtype` branch when transformers < 4.56 leaves the matrix.
    """
    return {"dtype": dtype} if transformers_at_least("4.56") else {"torch_dtype": dtype}
