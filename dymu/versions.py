"""Installed package versions, parsed once. Which fix a version needs is decided only in
`compat` from `patches/fixes.toml`; this module only reports what is installed."""

from __future__ import annotations

import functools
import importlib.metadata

from packaging.version import Version


@functools.cache
def installed(package: str) -> Version | None:
    """The installed version of `package`, or None."""
    try:
        return Version(importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None
