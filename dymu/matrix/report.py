"""Aggregate cell results into reports/matrix.json, matrix.md and matrix.html.

Standard library only, so nox's own interpreter can run it as a file
(`python dymu/matrix/report.py reports`); `dymu matrix report` calls the same code.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

FIXES = ("scatter", "weights-only", "safetensors", "cache-format", "generate-kwargs", "cache-rename",
         "causal-mask", "loader-kwargs", "tokenizer", "legacy-import")  # fmt: skip
STAGES = ("import", "fixes", "inference", "golden", "bench")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def fix_verdict(entry: dict[str, Any] | None) -> str:
    """One word per fix and cell: fixed / ok / FAIL / n.a."""
    if entry is None or entry.get("verify") == "n.a.":
        return "n.a."
    if entry["verify"] != "held":
        return "FAIL"
    if entry["needed"] == "yes":
        return "fixed" if entry.get("negative") == "failed as documented" else "FAIL"
    return "ok"


def load_cells(folder: Path) -> list[dict[str, Any]]:
    cells = []
    for path in sorted(folder.glob("*.json")):
        try:
            cells.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as err:
            cells.append(
                {
                    "cell": path.stem,
                    "status": "fail",
                    "failure": {"class": "unreadable", "signature": str(err)},
                }
            )
    return cells


def summarize(cell: dict[str, Any]) -> dict[str, Any]:
    stages = cell.get("stages", {})
    fixes = {f["fix"]: f for f in stages.get("fixes", {}).get("fixes", [])}
    bench = stages.get("bench", {})
    return {
        "cell": cell.get("cell"),
        "where": cell.get("where", "cpu"),
        "torch": cell.get("versions", {}).get("torch", "?"),
        "transformers": cell.get("versions", {}).get("transformers", "?"),
        "status": cell.get("status", "?"),
        "expected": cell.get("expected", "pass"),
        "as_expected": cell.get("as_expected", cell.get("status") == "pass"),
        "failure": cell.get("failure"),
        "stages": {s: stages.get(s, {}).get("status", "-") for s in STAGES},
        "fixes": {name: fix_verdict(fixes.get(name)) for name in FIXES},
        "bench_ratio": bench.get("ratio_stock_over_dymu"),
    }


def render_markdown(rows: list[dict[str, Any]]) -> str:
    head = ["cell", "where", "torch", "transformers", "status", *STAGES, "stock/dymu", *FIXES]
    lines = ["# Compatibility matrix", "",
             "Fix verdicts: `fixed` = needed here, verify() held and the negative control failed as documented; "
             "`ok` = not needed here (version outside its range) and verify() held; `FAIL`; `n.a.` = not "
             "checkable here (a dependency missing). Stages: pass / fail / -. `stock/dymu` is the tiny-model "
             "generate time ratio (random weights).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for r in rows:
        status = r["status"] if r["as_expected"] else f"**{r['status']} (unexpected)**"
        ratio = f"{r['bench_ratio']:.2f}" if isinstance(r["bench_ratio"], (int, float)) else "-"
        cells = [r["cell"], r["where"], r["torch"], r["transformers"], status, *r["stages"].values(), ratio,
                 *r["fixes"].values()]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    failures = [r for r in rows if r["failure"]]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            f = r["failure"]
            lines.append(f"- **{r['cell']}**: {f.get('class')} ({'known' if f.get('known') else 'unknown'} "
                         f"signature) `{f.get('signature', '')[:200]}`")  # fmt: skip
    return "\n".join(lines) + "\n"


def render_html(rows: list[dict[str, Any]]) -> str:
    colors = {"pass": "#d4f7d4", "fixed": "#d4f7d4", "ok": "#eef7ee", "known": "#fff3c4", "fail": "#f7d4d4",
              "FAIL": "#f7d4d4", "n.a.": "#eeeeee"}  # fmt: skip
    head = ["cell", "where", "torch", "transformers", "status", *STAGES, "stock/dymu", *FIXES]
    out = ["<!doctype html><meta charset='utf-8'><title>dymu compatibility matrix</title>",
           "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px 6px;font-size:13px}"
           "table{border-collapse:collapse}</style><h1>dymu compatibility matrix</h1>",
           f"<p>generated {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}</p><table><tr>"]  # fmt: skip
    out += [f"<th>{html.escape(h)}</th>" for h in head] + ["</tr>"]
    for r in rows:
        ratio = f"{r['bench_ratio']:.2f}" if isinstance(r["bench_ratio"], (int, float)) else "-"
        values = [r["cell"], r["where"], r["torch"], r["transformers"], r["status"], *r["stages"].values(), ratio,
                  *r["fixes"].values()]  # fmt: skip
        out.append("<tr>" + "".join(
            f"<td style='background:{colors.get(str(v), 'white')}'>{html.escape(str(v))}</td>" for v in values
        ) + "</tr>")  # fmt: skip
    out.append("</table>")
    return "\n".join(out) + "\n"


def build(reports: Path) -> dict[str, Any]:
    """Read reports/cells/*.json and reports/gpu/cells/*.json; write the three report files."""
    cells = load_cells(reports / "cells") + [
        {**c, "where": c.get("where", "gpu")} for c in load_cells(reports / "gpu" / "cells")
    ]
    rows = [summarize(c) for c in cells]
    data = {"schema": 1, "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "summary": rows, "cells": cells}  # fmt: skip
    _write(reports / "matrix.json", json.dumps(data, indent=1) + "\n")
    _write(reports / "matrix.md", render_markdown(rows))
    _write(reports / "matrix.html", render_html(rows))
    return data


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    reports = Path(args[0] if args else "reports")
    data = build(reports)
    print(render_markdown(data["summary"]))
    unexpected = [r["cell"] for r in data["summary"] if not r["as_expected"]]
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
