"""User-facing errors: one line naming the thing and the fix, no traceback."""

from __future__ import annotations


class DymuError(Exception):
    """An error caused by the user's input (a path, a file, a flag); the CLI prints it on one line."""
