"""How a stage's exception is recorded in a cell result (one line, plus the traceback's tail)."""

from __future__ import annotations

import traceback


def error_entry(err: BaseException) -> dict[str, str]:
    lines = traceback.format_exception(type(err), err, err.__traceback__)
    return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}",
            "traceback_tail": "".join(lines)[-1500:]}  # fmt: skip
