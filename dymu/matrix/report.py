"""Aggregate cell results into reports/matrix.json, matrix.md and matrix.html.

Standard library only, so nox's own interpreter runs it (`python -m dymu.matrix.report reports`);
`dymu matrix report` calls the same code.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import sys
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic as write_text
from ..compat.registry import fixes

FIXES = tuple(fixes())
STAGES = ("import", "fixes", "inference", "golden", "bench", "full-size")


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
    for path in sorted(p for p in folder.glob("*.json") if not p.name.endswith(".runner.json")):
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
        "where": cell.get("where", "cpu") + ("/docker" if cell.get("backend") == "docker" else ""),
        "torch": cell.get("versions", {}).get("torch", "?"),
        "transformers": cell.get("versions", {}).get("transformers", "?"),
        "status": cell.get("status", "?"),
        "expected": cell.get("expected", "pass"),
        "as_expected": cell.get("as_expected", cell.get("status") == "pass"),
        "failure": cell.get("failure"),
        "skip_reason": cell.get("skip_reason"),
        "stages": {s: stages.get(s, {}).get("status", "-") for s in STAGES},
        "fixes": {name: fix_verdict(fixes.get(name)) for name in FIXES},
        "bench_ratio": bench.get("ratio_stock_over_dymu"),
        "task_accuracy": task_accuracy(stages.get("inference", {})),
        "full_size": full_size_summary(stages.get("full-size", {})),
    }


def task_accuracy(stage: dict[str, Any]) -> str:
    """`stock / DyMU` accuracy of the trained tiny model on the shapes test set, the lowest over the
    cases that ran (every case should agree: the golden file holds their answers); `-` if none ran."""
    runs = [
        c["task_accuracy"]
        for c in stage.get("cases", {}).values()
        if isinstance(c.get("task_accuracy"), dict)
    ]
    if not runs:
        return "-"
    return f"{min(r['stock'] for r in runs):.2f} / {min(r['dymu'] for r in runs):.2f}"


def full_size_summary(stage: dict[str, Any]) -> dict[str, Any] | None:
    """The headline numbers of a full-size GPU stage (None where it did not run)."""
    checks = stage.get("checks")
    if stage.get("status") not in ("pass", "fail") or not checks:
        return None
    identity, rounding = checks.get("identity", {}), checks.get("bf16-rounding", {})
    rows = stage.get("bench", {}).get("rows", [])
    return {
        "device": stage.get("device"),
        "identity_fp32": identity.get("cache_relative_error"),
        "bf16_stock": rounding.get("stock_low_vs_fp32", {}).get("cache_relative_error"),
        "bf16_dymu": rounding.get("dymu_low_vs_fp32", {}).get("cache_relative_error"),
        "visual_tokens": checks.get("dymu", {}).get("visual_tokens"),
        "ratios": {r["batch_size"]: r["ratios_stock_over_dymu"] for r in rows},
    }


def status_text(row: dict[str, Any]) -> str:
    """A row's status cell: `pass`; `expected <outcome>` for a failure the cell expects (a broken
    cell doing its job, e.g. `expected crash`), so it reads neither as a pass nor as a failure to
    chase; `<status> (unexpected)` for anything else its `expect` did not foresee."""
    if not row["as_expected"]:
        return f"{row['status']} (unexpected)"
    if row["status"] in ("pass", "skipped"):
        return row["status"]
    return f"expected {row['expected']}"


def headline(rows: list[dict[str, Any]]) -> str:
    """The page's first line: how many cells behaved as their `expect` says, and which did not."""

    def label(r: dict[str, Any]) -> str:  # one cell can run on several backends
        return r["cell"] if r["where"] == "cpu" else f"{r['cell']} [{r['where']}]"

    skipped = [label(r) for r in rows if r["status"] == "skipped"]
    ran = [r for r in rows if r["status"] != "skipped"]
    wrong = [f"{label(r)} ({status_text(r)})" for r in ran if not r["as_expected"]]
    on_purpose = [label(r) for r in ran if r["as_expected"] and r["status"] != "pass"]
    line = f"{len(ran) - len(wrong)} of {len(ran)} cells behaved as expected"
    if on_purpose:
        line += f" ({len(on_purpose)} of them failing on purpose: {', '.join(on_purpose)})"
    line += f"; not as expected: {', '.join(wrong)}" if wrong else "; none did otherwise"
    return line + (f"; skipped here: {', '.join(skipped)} (see Skipped)." if skipped else ".")


def _num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def _md_table(head: list[str], rows: list[list[Any]]) -> list[str]:
    """A GitHub markdown table."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]  # fmt: skip


def full_size_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """A table of the full-size GPU stages (random weights: checks and timing ratios only)."""
    runs = [r for r in rows if r["full_size"]]
    if not runs:
        return []
    sizes = sorted({b for r in runs for b in r["full_size"]["ratios"]}, key=int)
    head = ["cell", "device", "identity fp32", "bf16 drift stock / dymu", "visual tokens",
            *(f"{what} x, bs {b}" for b in sizes for what in ("vision", "prefill"))]  # fmt: skip
    rows_out = []
    for r in runs:
        f = r["full_size"]
        ratios = [
            _num(f["ratios"].get(b, {}).get(what), ".2f") for b in sizes for what in ("vision", "prefill")
        ]
        rows_out.append([r["cell"], f["device"], _num(f["identity_fp32"], ".1e"),
                         f"{_num(f['bf16_stock'], '.3f')} / {_num(f['bf16_dymu'], '.3f')}", f["visual_tokens"],
                         *ratios])  # fmt: skip
    return ["", "## Full-size stage (GPU cells)", "",
            "LLaVA-1.5-7B architecture with RANDOM weights. `identity fp32`: worst relative error of the KV "
            "cache, DyMU with merging off vs stock (gate 1e-3). `bf16 drift`: each path's bf16 KV cache vs the "
            "float32 stock one (gate: DyMU <= 2x stock). Ratios are stock/DyMU time measured side by side "
            "(> 1: DyMU faster).", "", *_md_table(head, rows_out)]  # fmt: skip


def render_markdown(rows: list[dict[str, Any]]) -> str:
    head = ["cell", "where", "torch", "transformers", "status", *STAGES, "accuracy stock / dymu", "stock/dymu",
            *FIXES]  # fmt: skip
    lines = ["# Compatibility matrix", "", f"**{headline(rows)}**", "",
             "Fix verdicts: `fixed` = needed here, verify() held and the negative control failed as documented; "
             "`ok` = not needed here (version outside its range) and verify() held; `FAIL`; `n.a.` = not "
             "checkable here (a dependency missing). Stages: pass / fail / -. `accuracy stock / dymu`: the trained "
             "tiny model on the shapes test set (48 questions). `stock/dymu` is the tiny-model generate time "
             "ratio (CPU).", ""]  # fmt: skip
    table = []
    for r in rows:
        status = status_text(r) if r["as_expected"] else f"**{status_text(r)}**"
        ratio = f"{r['bench_ratio']:.2f}" if isinstance(r["bench_ratio"], (int, float)) else "-"
        table.append([r["cell"], r["where"], r["torch"], r["transformers"], status, *r["stages"].values(),
                      r["task_accuracy"], ratio, *r["fixes"].values()])  # fmt: skip
    lines += _md_table(head, table)
    lines += full_size_markdown(rows)
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        lines += ["", "## Skipped", "", *(f"- **{r['cell']}**: {r['skip_reason']}" for r in skipped)]
    failures = [r for r in rows if r["failure"]]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            f = r["failure"]
            log = f" ([log]({r['log']}))" if r.get("log") else ""
            lines.append(f"- **{r['cell']}** ({r['where']}): {f.get('class')} ({'known' if f.get('known') else 'unknown'} "
                         f"signature) `{f.get('signature', '')[:200]}`{log}")  # fmt: skip
    return "\n".join(lines) + "\n"


def render_html(rows: list[dict[str, Any]]) -> str:
    colors = {"pass": "#d4f7d4", "fixed": "#d4f7d4", "ok": "#eef7ee", "known": "#fff3c4", "fail": "#f7d4d4",
              "FAIL": "#f7d4d4", "n.a.": "#eeeeee"}  # fmt: skip
    status_colors = {"pass": colors["pass"], "expected": colors["known"], "unexpected": colors["fail"],
                     "skipped": colors["n.a."]}  # fmt: skip
    head = ["cell", "where", "torch", "transformers", "status", *STAGES, "accuracy stock / dymu", "stock/dymu",
            *FIXES]  # fmt: skip
    out = ["<!doctype html><meta charset='utf-8'><title>dymu compatibility matrix</title>",
           "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px 6px;font-size:13px}"
           "table{border-collapse:collapse}</style><h1>dymu compatibility matrix</h1>",
           f"<p id='headline'><b>{html.escape(headline(rows))}</b></p>",
           f"<p>generated {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}</p><table><tr>"]  # fmt: skip
    out += [f"<th>{html.escape(h)}</th>" for h in (*head, "log")] + ["</tr>"]
    for r in rows:
        ratio = f"{r['bench_ratio']:.2f}" if isinstance(r["bench_ratio"], (int, float)) else "-"
        status = status_text(r)
        kind = (
            "unexpected" if not r["as_expected"] else status if status in ("pass", "skipped") else "expected"
        )
        values = [
            (v, colors.get(str(v), "white")) for v in (r["cell"], r["where"], r["torch"], r["transformers"])
        ]
        values.append((status, status_colors[kind]))
        values += [
            (v, colors.get(str(v), "white"))
            for v in (*r["stages"].values(), r["task_accuracy"], ratio, *r["fixes"].values())
        ]
        log = f"<a href='{html.escape(r['log'])}'>log</a>" if r.get("log") else "-"
        out.append("<tr>" + "".join(
            f"<td style='background:{color}'>{html.escape(str(v))}</td>" for v, color in values
        ) + f"<td>{log}</td></tr>")  # fmt: skip
    out.append("</table>")
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        out.append("<h2>Skipped</h2><ul>")
        out += [
            f"<li><b>{html.escape(str(r['cell']))}</b>: {html.escape(str(r['skip_reason']))}</li>"
            for r in skipped
        ]
        out.append("</ul>")
    failures = [r for r in rows if r["failure"]]
    if failures:
        out.append("<h2>Failures</h2><ul>")
        for r in failures:
            f = r["failure"]
            log = f" (<a href='{html.escape(r['log'])}'>log</a>)" if r.get("log") else ""
            out.append(f"<li><b>{html.escape(str(r['cell']))}</b>: {html.escape(status_text(r))}, "
                       f"<code>{html.escape(str(f.get('signature', ''))[:200])}</code>{log}</li>")  # fmt: skip
        out.append("</ul>")
    full_size = full_size_markdown(rows)
    if full_size:
        out += ["<h2>Full-size stage (GPU cells)</h2>", f"<p>{html.escape(full_size[3])}</p>", "<table>"]
        for i, line in enumerate(full_size[5:]):
            if i == 1:  # the markdown separator row
                continue
            tag = "th" if i == 0 else "td"
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
        out.append("</table>")
    return "\n".join(out) + "\n"


def log_link(reports: Path, cell: dict[str, Any]) -> str | None:
    """The cell's log relative to the reports folder (where matrix.html sits), if it is there."""
    sub = {"docker": "docker/logs", "gpu": "gpu/logs"}.get(
        "docker" if cell.get("backend") == "docker" else str(cell.get("where")), "logs"
    )
    name = f"{sub}/{cell.get('cell')}.log"
    return name if (reports / name).is_file() else None


def build(reports: Path) -> dict[str, Any]:
    """Read reports/{cells,docker/cells,gpu/cells}/*.json; write the three report files."""
    cells = (
        load_cells(reports / "cells")
        + [{**c, "backend": "docker"} for c in load_cells(reports / "docker" / "cells")]
        + [{**c, "where": c.get("where", "gpu")} for c in load_cells(reports / "gpu" / "cells")]
    )
    rows = [summarize(c) for c in cells]
    for row, cell in zip(rows, cells, strict=True):
        row["log"] = log_link(reports, cell)
    data = {"schema": 1, "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "summary": rows, "cells": cells}  # fmt: skip
    write_text(reports / "matrix.json", json.dumps(data, indent=1) + "\n")
    write_text(reports / "matrix.md", render_markdown(rows))
    write_text(reports / "matrix.html", render_html(rows))
    return data


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    reports = Path(args[0] if args else "reports")
    if not any((reports / sub).is_dir() for sub in ("cells", "gpu/cells", "docker/cells")):
        print(f"dymu: error: {reports}: no cell results (cells/, gpu/cells/ or docker/cells/) to report; "
              "run `nox -s matrix` first or pass the reports folder", file=sys.stderr)  # fmt: skip
        return 2
    data = build(reports)
    print(render_markdown(data["summary"]))
    unexpected = [r["cell"] for r in data["summary"] if not r["as_expected"]]
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
