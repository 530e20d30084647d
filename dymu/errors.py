"""User-facing errors: one line naming the thing and the fix, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class DymuError(Exception):
    """An error caused by the user's input (a path, a file, a flag); the CLI prints it on one line."""


def run_main(main: Callable[[], int]) -> NoReturn:
    """`python -m dymu...` entry points: a DymuError is one line on stderr and exit code 2."""
    try:
        code = main()
    except DymuError as err:
        print(f"dymu: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("dymu: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
