"""The `dymu bench` report: the users' keys and units per mode (`meta`, `summary`, `samples`),
plus stage statistics, a side-by-side comparison with bootstrap intervals, answer quality where
the data file carries answers, a Markdown summary and plots. Valid JSON only (no NaN/Infinity);
`report.schema.json` describes it and the tests validate every report against it.
"""

from __future__ import annotations

import math
import random
import statistics
from pathlib import Path
from typing import Any

from ..atomic import write_atomic, write_text_atomic
from ..jsonsafe import dumps as strict_dumps
from ..jsonsafe import finite
from .data import DataFile
from .quality import caption_metrics, exact_match, mmbench_accuracy
from .run import SCHEMA_VERSION, time_now

SCHEMA_FILE = Path(__file__).with_name("report.schema.json")
STAGES = ("preprocess", "vision", "prefill", "first_step", "ttft", "tpot", "e2e")
DEFINITIONS = {
    "e2e": "seconds from the sample's start (before preprocessing) to the last token on the host",
    "ttft": "seconds from the start to the first generated token on the host (synchronised)",
    "tbt": "seconds, mean gap between consecutive generated tokens of the sample (CUDA events per step)",
    "tps": "generated tokens per second of end-to-end time (out_len / e2e)",
    "out_len": "new tokens only, up to and including the first EOS; counted the same way in every mode",
    "in_len": "prompt tokens the LLM receives: text tokens + visual tokens (576 for stock, the merged count "
    "for DyMU)",
    "vram": "MB, torch.cuda.max_memory_allocated during the sample's batch",
    "stages_ms": "preprocess (host), vision (CLIP + DToMe + projector), prefill (LLM prompt pass into the cache), "
    "first_step (first decode step), ttft, tpot (mean inter-token latency), e2e; milliseconds",
}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def stats(values: list[float | None]) -> dict[str, float | int | None]:
    """mean / p50 / p90 / p95 / p99 / std of the finite values (None when there are none)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p95": None, "p99": None, "std": None}
    return {"n": len(vals), "mean": statistics.fmean(vals), "p50": percentile(vals, 0.5), "p90": percentile(vals, 0.9),
            "p95": percentile(vals, 0.95), "p99": percentile(vals, 0.99),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}  # fmt: skip


def _avg(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _pct(values: list[Any], q: float) -> float | None:
    vals = [v for v in values if v is not None]
    return percentile(vals, q) if vals else None


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The users' summary keys (seconds, MB), over the samples that ran."""
    ok = [r for r in rows if not r["failed"]]
    e2e, ttft, tbt = [r["e2e"] for r in ok], [r["ttft"] for r in ok], [r["tbt"] for r in ok]
    tps = [r["out_len"] / r["e2e"] if r["e2e"] else None for r in ok]
    vram = [r.get("vram") for r in ok if r.get("vram") is not None]
    return {
        "e2e_p50": _pct(e2e, 0.5), "e2e_p95": _pct(e2e, 0.95), "ttft_p50": _pct(ttft, 0.5),
        "ttft_p95": _pct(ttft, 0.95), "ttft_avg": _avg(ttft), "tps_p50": _pct(tps, 0.5), "tps_avg": _avg(tps),
        "tbt_p50": _pct(tbt, 0.5), "tbt_p95": _pct(tbt, 0.95), "tbt_avg": _avg(tbt),
        "vram_max_mb": max(vram) if vram else None, "avg_output_len": _avg([r["out_len"] for r in ok]),
        "avg_input_len": _avg([r["in_len"] for r in ok]),
        "samples_ok": len(ok), "samples_failed": len(rows) - len(ok),
    }  # fmt: skip


def visual_token_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    counts = [r["visual_tokens"] for r in rows if not r["failed"]]
    if not counts:
        return {"n": 0}
    return {"n": len(counts), "mean": statistics.fmean(counts), "std": statistics.pstdev(counts),
            "min": min(counts), "max": max(counts)}  # fmt: skip


def sample_entry(row: dict[str, Any]) -> dict[str, Any]:
    """One sample in the users' keys, plus ours."""
    if row["failed"]:
        return {"index": row["index"], "failed": True, "error": row.get("error", "")}
    keep = ("index", "e2e", "ttft", "tbt", "vram", "out_len", "in_len", "failed", "text", "token_ids", "text_tokens",
            "visual_tokens", "virtual_len", "per_layer_tokens", "stages_ms", "itl_ms", "vram_reserved", "batch",
            "batch_size", "oom_retries", "graph_captures", "decode")  # fmt: skip
    return {k: row[k] for k in keep if k in row}


def bootstrap_ratio(base: dict[str, float], other: dict[str, float], resamples: int = 1000,
                    seed: int = 0) -> dict[str, Any] | None:  # fmt: skip
    """mean(base) / mean(other) over the samples both have, with a paired bootstrap 95% interval."""
    keys = sorted(set(base) & set(other), key=str)
    if not keys or not sum(other[k] for k in keys):
        return None
    ratio = sum(base[k] for k in keys) / sum(other[k] for k in keys)
    rng, draws = random.Random(seed), []
    for _ in range(resamples):
        pick = [rng.choice(keys) for _ in keys]
        den = sum(other[k] for k in pick)
        if den:
            draws.append(sum(base[k] for k in pick) / den)
    return {"ratio": ratio, "ci95": [percentile(draws, 0.025), percentile(draws, 0.975)] if draws else None,
            "n": len(keys)}  # fmt: skip


def comparison(by_mode: dict[str, list[dict[str, Any]]], baseline: str) -> dict[str, Any]:
    """Each other mode against the baseline: stage ratios (baseline / mode: > 1 is faster) and how
    often the two answered alike."""

    def per_sample(rows: list[dict[str, Any]], stage: str) -> dict[str, float]:
        return {str(r["index"]): r["stages_ms"][stage] for r in rows
                if not r["failed"] and r["stages_ms"].get(stage) is not None}  # fmt: skip

    out: dict[str, Any] = {}
    base = by_mode.get(baseline, [])
    for name, rows in by_mode.items():
        if name == baseline:
            continue
        texts_a = {str(r["index"]): r for r in base if not r["failed"]}
        texts_b = {str(r["index"]): r for r in rows if not r["failed"]}
        common = sorted(set(texts_a) & set(texts_b))
        same_text = sum(texts_a[k]["text"] == texts_b[k]["text"] for k in common)
        agree = [sum(a == b for a, b in zip(texts_a[k]["token_ids"], texts_b[k]["token_ids"], strict=False))
                 / max(len(texts_a[k]["token_ids"]), len(texts_b[k]["token_ids"]), 1) for k in common]  # fmt: skip
        out[name] = {
            "baseline": baseline,
            "ratios": {stage: bootstrap_ratio(per_sample(base, stage), per_sample(rows, stage)) for stage in STAGES},
            "answer_agreement": {"n": len(common), "same_text": same_text / len(common) if common else None,
                                 "token_agreement": statistics.fmean(agree) if agree else None},
        }  # fmt: skip
    return out


def quality(rows: list[dict[str, Any]], data: DataFile, random_weights: bool) -> dict[str, Any] | None:
    """MMBench accuracy or COCO caption metrics where the data file carries answers."""
    by_index = {str(s.index): s for s in data.samples}
    ok = [r for r in rows if not r["failed"] and str(r["index"]) in by_index]
    note = "RANDOM weights: accuracy has no meaning" if random_weights else None
    mc = [r for r in ok if by_index[str(r["index"])].answer]
    if mc:
        records = [{"index": int(by_index[str(r["index"])].index), "prediction": r["text"],
                    "answer": by_index[str(r["index"])].answer, "options": by_index[str(r["index"])].options,
                    "category": by_index[str(r["index"])].category,
                    "l2_category": by_index[str(r["index"])].l2_category} for r in mc]  # fmt: skip
        return {"kind": "mmbench", "note": note, **mmbench_accuracy(records)}
    refs = {
        str(r["index"]): by_index[str(r["index"])].references
        for r in ok
        if by_index[str(r["index"])].references
    }
    if refs:
        texts = {str(r["index"]): r["text"] for r in ok}
        preds = {k: texts[k] for k in refs}
        matched = {"exact_match": exact_match(preds, refs)}
        try:
            return {"kind": "captions", "note": note, **matched, **caption_metrics(preds, refs)}
        except Exception as err:  # an optional scorer: say why there is no number
            return {"kind": "captions", "note": note, **matched, "error": str(err)}
    return None


def build(
    info: dict[str, Any], rows: list[dict[str, Any]], data: DataFile, interrupted: bool
) -> dict[str, Any]:
    """The whole report from the run info and every finished row."""
    names = [m["name"] for m in info["modes"]]
    by_mode = {name: [r for r in rows if r["mode"] == name] for name in names}
    random_weights = "random" in info["weights"].lower()
    modes = {}
    for name, mode_rows in by_mode.items():
        modes[name] = {
            "summary": summary(mode_rows),
            "stages": {stage: stats([r["stages_ms"].get(stage) for r in mode_rows if not r["failed"]])
                       for stage in STAGES},
            "itl_ms": stats([x for r in mode_rows if not r["failed"] for x in r["itl_ms"]]),
            "visual_tokens": visual_token_stats(mode_rows),
            "graph_captures": sum(r.get("graph_captures", 0) for r in mode_rows if not r["failed"]),
            "quality": quality(mode_rows, data, random_weights),
            "samples": [sample_entry(r) for r in mode_rows],
        }  # fmt: skip
    baseline = "stock" if "stock" in names else names[0]
    return finite({
        "schema_version": SCHEMA_VERSION, "generated": time_now(), "partial": interrupted, "run": info,
        "meta": data.meta, "definitions": DEFINITIONS, "modes": modes, "comparison": comparison(by_mode, baseline),
    })  # fmt: skip


def mode_file(report: dict[str, Any], name: str) -> dict[str, Any]:
    """One mode in exactly the users' layout (`meta`, `summary`, `samples`), for their analysis."""
    mode = report["modes"][name]
    return {"meta": report["meta"], "summary": mode["summary"], "samples": mode["samples"],
            "mode": name, "schema_version": report["schema_version"], "run": report["run"]}  # fmt: skip


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    run = report["run"]
    lines = [f"# dymu bench: {Path(run['data_file']).name}", "",
             f"{run['device']}, {run['dtype']}, torch {run['torch']}, transformers {run['transformers']}; weights: "
             f"{run['weights']}; {run['batch_kind']}; max_new_tokens {run['settings']['max_new_tokens']}"
             + (" (PARTIAL: interrupted)" if report["partial"] else ""), "",
             "Means over samples (ms). Graph captures: CUDA graphs the DToMe tower and the VTU prefill captured "
             "inside timed samples (each new shape bucket is captured once, 0.1-0.3 s, then replayed).", "",
             "| mode | samples | visual tokens | vision ms | prefill ms | TTFT ms | TPOT ms | e2e ms | out len | "
             "VRAM MB | graph captures |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, mode in report["modes"].items():
        st, vt = mode["stages"], mode["visual_tokens"]
        lines.append(f"| {name} | {mode['summary']['samples_ok']} | {_fmt(vt.get('mean'))} | "
                     f"{_fmt(st['vision']['mean'], digits=2)} | {_fmt(st['prefill']['mean'], digits=2)} | "
                     f"{_fmt(st['ttft']['mean'], digits=2)} | {_fmt(st['tpot']['mean'], digits=2)} | "
                     f"{_fmt(st['e2e']['mean'], digits=1)} | {_fmt(mode['summary']['avg_output_len'])} | "
                     f"{_fmt(mode['summary']['vram_max_mb'], digits=0)} | {mode['graph_captures']} |")  # fmt: skip
    for name, comp in report["comparison"].items():
        lines += ["", f"## {comp['baseline']} / {name} (> 1: {name} faster; paired bootstrap 95% interval)", "",
                  "| stage | ratio | 95% interval |", "|---|---|---|"]  # fmt: skip
        for stage, r in comp["ratios"].items():
            if r:
                ci = r["ci95"] or [None, None]
                lines.append(
                    f"| {stage} | {r['ratio']:.2f}x | {_fmt(ci[0], digits=2)}-{_fmt(ci[1], digits=2)} |"
                )
        agree = comp["answer_agreement"]
        lines.append(f"\nSame answer text in {_fmt(agree['same_text'], 100)}% of {agree['n']} samples; "
                     f"token agreement {_fmt(agree['token_agreement'], 100)}%.")  # fmt: skip
    for name, mode in report["modes"].items():
        q = mode["quality"]
        if q:
            shown = {k: v for k, v in q.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            lines.append(f"\nQuality ({name}, {q['kind']}): " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
                         + (f" — {q['note']}" if q.get("note") else "") + (f" ({q['error']})" if q.get("error") else ""))  # fmt: skip
    return "\n".join(lines) + "\n"


def plots(report: dict[str, Any], stem: Path) -> list[Path]:
    """Per-stage latency by mode, the visual-token histogram, TTFT against visual tokens (PNG);
    none without matplotlib (an optional dependency)."""
    try:
        import matplotlib  # noqa: PLC0415 - optional dependency

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 - optional dependency
    except ImportError:
        return []
    written = []
    names = list(report["modes"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(names))
    shown = ("vision", "prefill", "ttft", "tpot")
    for i, name in enumerate(names):
        means = [report["modes"][name]["stages"][s]["mean"] or 0 for s in shown]
        ax.bar([x + i * width for x in range(len(shown))], means, width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(shown))], shown)
    ax.set_ylabel("ms (mean)")
    ax.legend()
    ax.set_title("stage latency by mode")
    written.append(_save(fig, stem.with_name(stem.name + "_latency.png")))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        counts = [s["visual_tokens"] for s in report["modes"][name]["samples"] if not s.get("failed")]
        if counts:
            ax.hist(counts, bins=20, alpha=0.6, label=name)
    ax.set_xlabel("visual tokens the LLM received")
    ax.legend()
    written.append(_save(fig, stem.with_name(stem.name + "_visual_tokens.png")))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        ok = [s for s in report["modes"][name]["samples"] if not s.get("failed")]
        ax.scatter([s["visual_tokens"] for s in ok], [s["ttft"] * 1e3 for s in ok], s=10, label=name)
    ax.set_xlabel("visual tokens")
    ax.set_ylabel("TTFT ms")
    ax.legend()
    written.append(_save(fig, stem.with_name(stem.name + "_ttft_vs_tokens.png")))
    plt.close("all")
    return written


def _save(fig: Any, path: Path) -> Path:
    return write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))


def dumps(obj: Any) -> str:
    return strict_dumps(obj, indent=1) + "\n"


def write(report: dict[str, Any], report_file: Path, with_plots: bool = True) -> list[Path]:
    """The report, one file per mode in the users' layout, the Markdown summary and the plots."""
    stem = report_file.with_suffix("")
    written = [write_text_atomic(report_file, dumps(report))]
    for name in report["modes"]:
        written.append(
            write_text_atomic(stem.with_name(f"{stem.name}.{name}.json"), dumps(mode_file(report, name)))
        )
    written.append(write_text_atomic(stem.with_suffix(".md"), markdown(report)))
    if with_plots:
        written += plots(report, stem)
    return written
