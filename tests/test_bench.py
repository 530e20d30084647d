"""`dymu bench` end to end on the tiny model: every report file, the schema, resume after an
interrupt or a torn row file, failed samples, hand-checked statistics, and planted delays that
must show up in their own stage only."""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from dymu.bench import report as bench_report
from dymu.bench import run as bench_run
from dymu.bench.command import main as bench_main
from dymu.bench.data import SAMPLE_DATA, load_data_file
from dymu.cli import main as cli_main
from dymu.cuda_graph import release_compile_workers
from dymu.errors import DymuError
from dymu.options import Options

SCHEMA = json.loads(bench_report.SCHEMA_FILE.read_text())
LOAD_TARGET = bench_run.load_target


def validate(report: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(report, SCHEMA)


def strict_json(path: Path) -> dict:
    """Parse as a strict JSON reader would (NaN / Infinity are not JSON)."""

    def refuse(token: str) -> None:
        raise ValueError(f"{path}: non-JSON number {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_end_to_end_run_writes_every_report_file(tmp_path, capsys) -> None:
    out = tmp_path / "report.json"
    code = cli_main(["bench", "--report-file", str(out), "--max-new-tokens", "4", "--limit", "3", "--no-progress",
                     "--json"])  # fmt: skip
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    report = strict_json(out)
    validate(report)
    assert set(report["modes"]) == {"stock", "dymu"} and not report["partial"]
    for name in ("stock", "dymu"):
        mode_file = strict_json(tmp_path / f"report.{name}.json")
        assert set(mode_file) >= {"meta", "summary", "samples"}
        assert set(mode_file["summary"]) >= {"e2e_p50", "e2e_p95", "ttft_p50", "ttft_p95", "ttft_avg", "tps_p50",
                                             "tps_avg", "tbt_p50", "tbt_p95", "tbt_avg", "vram_max_mb",
                                             "avg_output_len", "avg_input_len"}  # fmt: skip
        assert len(mode_file["samples"]) == 3 and all(
            s["out_len"] == 4 or s["text"] for s in mode_file["samples"]
        )
    stock, dymu = report["modes"]["stock"], report["modes"]["dymu"]
    assert all(s["visual_tokens"] == 64 for s in stock["samples"])  # the tiny tower's 8 x 8 patches
    assert all(
        s["in_len"] == s["text_tokens"] + s["visual_tokens"] for s in stock["samples"] + dymu["samples"]
    )
    assert dymu["visual_tokens"]["mean"] < 64, "calibrated on the data's images, DyMU must merge"
    assert report["comparison"]["dymu"]["ratios"]["e2e"]["ratio"] > 0
    assert (tmp_path / "report.md").read_text().startswith("# dymu bench")
    assert (tmp_path / "report.jsonl").is_file() and (tmp_path / "thresholds_dymu.safetensors").is_file()
    assert str(out) in printed["written"]


def _cfg(tmp_path: Path, **kw) -> bench_run.BenchConfig:
    base = {"report_file": str(tmp_path / "r.json"), "data_file": str(SAMPLE_DATA), "max_new_tokens": 3,
            "progress": False, "warmup": 0}  # fmt: skip
    return bench_run.BenchConfig(**{**base, **kw})


def test_an_interrupt_leaves_a_valid_partial_report_that_resume_completes(tmp_path, monkeypatch) -> None:
    real = bench_run.run_batch
    calls = {"n": 0}

    def interrupted_on_the_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_run, "run_batch", interrupted_on_the_fourth)
    cfg = _cfg(tmp_path, limit=4)
    info, rows, interrupted = bench_run.run(cfg, ["test"])
    assert interrupted and len(rows) == 3  # stock+dymu of sample 0, stock of sample 1
    partial = bench_report.build(info, rows, load_data_file(SAMPLE_DATA), interrupted)
    validate(partial)
    assert partial["partial"] and len(partial["modes"]["dymu"]["samples"]) == 1
    monkeypatch.setattr(bench_run, "run_batch", real)
    info, rows, interrupted = bench_run.run(
        bench_run.BenchConfig(**{**cfg.__dict__, "resume": True}), ["test"]
    )
    assert not interrupted
    keys = [(r["mode"], r["index"]) for r in rows]
    assert len(keys) == len(set(keys)) == 8, "every (mode, sample) once: nothing redone, nothing lost"


def test_resume_survives_a_torn_last_row_and_refuses_other_settings(tmp_path) -> None:
    cfg = _cfg(tmp_path, limit=2)
    bench_run.run(cfg, ["test"])
    stream = bench_run.jsonl_path(Path(cfg.report_file))
    lines = stream.read_text().splitlines()
    stream.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # a kill mid-write
    _, rows, _ = bench_run.run(bench_run.BenchConfig(**{**cfg.__dict__, "resume": True}), ["test"])
    assert sorted((r["mode"], r["index"]) for r in rows) == sorted(
        (m, i) for m in ("stock", "dymu") for i in (0, 1)
    )
    with pytest.raises(DymuError, match="other settings"):
        bench_run.run(
            bench_run.BenchConfig(**{**cfg.__dict__, "resume": True, "max_new_tokens": 5}), ["test"]
        )


def test_missing_and_corrupt_images_are_failed_samples_not_a_failed_run(tmp_path) -> None:
    data = json.loads(SAMPLE_DATA.read_text())
    items = data["data"][:3]
    for item in items:
        item["image_paths"] = [str((SAMPLE_DATA.parent / p).resolve()) for p in item["image_paths"]]
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    items[1]["image_paths"] = [str(tmp_path / "missing.jpg")]
    items[2]["image_paths"] = [str(tmp_path / "broken.jpg")]
    for item in items:
        item["prompt_struct"] = [{"type": "image", "value": item["image_paths"][0]},
                                 {"type": "text", "value": item["text_prompt"]}]  # fmt: skip
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"meta": {"name": "t"}, "data": items}))
    info, rows, _ = bench_run.run(_cfg(tmp_path, data_file=str(path)), ["test"])
    report = bench_report.build(info, rows, load_data_file(path), False)
    validate(report)
    for mode in report["modes"].values():
        assert mode["summary"]["samples_ok"] == 1 and mode["summary"]["samples_failed"] == 2
        errors = [s["error"] for s in mode["samples"] if s["failed"]]
        assert any("missing.jpg" in e for e in errors) and any("not a readable image" in e for e in errors)


def test_summary_statistics_match_hand_computed_values() -> None:
    assert bench_report.percentile([1, 2, 3, 4], 0.5) == 2.5  # halfway between ranks 1 and 2
    assert bench_report.percentile([10, 20, 30, 40, 50], 0.95) == pytest.approx(48.0)  # 40 + 0.8 * 10
    s = bench_report.stats([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    assert s["mean"] == 5.0 and s["p50"] == 4.5 and s["std"] == pytest.approx(2.138089935)  # sample std
    rows = [{"failed": False, "e2e": 2.0, "ttft": 0.5, "tbt": 0.1, "out_len": 10, "in_len": 100, "vram": 300.0},
            {"failed": False, "e2e": 4.0, "ttft": 1.5, "tbt": 0.3, "out_len": 20, "in_len": 120, "vram": 500.0},
            {"failed": True, "error": "x"}]  # fmt: skip
    summary = bench_report.summary(rows)
    assert (
        summary["e2e_p50"] == 3.0 and summary["ttft_avg"] == 1.0 and summary["tbt_avg"] == pytest.approx(0.2)
    )
    assert summary["tps_avg"] == 5.0 and summary["vram_max_mb"] == 500.0  # 10/2 and 20/4 tokens per second
    assert (
        summary["avg_output_len"] == 15 and summary["avg_input_len"] == 110 and summary["samples_failed"] == 1
    )
    ratio = bench_report.bootstrap_ratio({"a": 4.0, "b": 6.0}, {"a": 2.0, "b": 3.0})
    assert ratio["ratio"] == 2.0 and ratio["ci95"] == [2.0, 2.0]  # every resample has the same ratio


def _planted(tmp_path: Path, monkeypatch, where: str | None) -> dict[str, float]:
    def slowed(cfg, device, dtype):
        model, weights = LOAD_TARGET(cfg, device, dtype)
        if where is not None:
            module = {"vision": model.parts.projector, "decode": model.parts.lm_head}[where]
            module.register_forward_hook(lambda *_: time.sleep(0.05))
        return model, weights

    monkeypatch.setattr(bench_run, "load_target", slowed)
    info, rows, _ = bench_run.run(_cfg(tmp_path / str(where), modes="stock", limit=3, warmup=1), ["test"])
    stages = bench_report.build(info, rows, load_data_file(SAMPLE_DATA), False)["modes"]["stock"]["stages"]
    return {k: v["p50"] for k, v in stages.items()}


def test_a_planted_delay_appears_in_its_own_stage_only(tmp_path, monkeypatch) -> None:
    torch.set_num_threads(1)  # steadier CPU timings
    clean = _planted(tmp_path, monkeypatch, None)
    vision = _planted(tmp_path, monkeypatch, "vision")
    decode = _planted(tmp_path, monkeypatch, "decode")
    assert vision["vision"] - clean["vision"] > 45  # the 50 ms sleep in the projector
    assert abs(vision["prefill"] - clean["prefill"]) < 25 and abs(vision["tpot"] - clean["tpot"]) < 25
    assert decode["tpot"] - clean["tpot"] > 45 and decode["first_step"] - clean["first_step"] > 45  # lm_head
    assert abs(decode["vision"] - clean["vision"]) < 25 and abs(decode["prefill"] - clean["prefill"]) < 25
    # TTFT sees both (a host time: on a loaded 2-core machine its p50 over 3 samples moved by up to 12 ms)
    assert vision["ttft"] - clean["ttft"] > 30 and decode["ttft"] - clean["ttft"] > 30


def test_modes_parse_variants_and_refuse_nonsense() -> None:
    modes = bench_run.parse_modes("stock,dymu,dymu-none:vtu=none", "fast", None)
    modes += bench_run.parse_modes("dymu-eager:graphs=off;vtu=none", "fast", None)
    assert modes[-1].options.cuda_graphs is False and modes[-1].options.fused_rope and modes[-1].vtu == "none"
    assert [(m.name, m.kind, m.vtu) for m in modes[:3]] == [("stock", "stock", "fast"), ("dymu", "dymu", "fast"),
                                                        ("dymu-none", "dymu", "none")]  # fmt: skip
    with pytest.raises(DymuError, match="given twice"):
        bench_run.parse_modes("dymu,dymu", "fast", None)
    with pytest.raises(DymuError, match="unknown option"):
        bench_run.parse_modes("stock:vtu=none", "fast", None)


def test_bad_flags_and_a_malformed_data_file_are_one_line_errors(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli_main(["bench", "--data-file", str(bad), "--report-file", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dymu: error: ") and "bad.json" in err[0]
    assert cli_main(["bench", "--dtype", "int8", "--report-file", str(tmp_path / "r.json")]) == 2
    assert "floating-point" in capsys.readouterr().err


def test_microbenchmarks_stay_available_as_subcommands(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        bench_main(["tower", "--help"])
    assert done.value.code == 0 and "--geometry" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "reports" / "gpu" / "bench").glob("*_b[0-9].json")),
                         ids=lambda p: p.name)  # fmt: skip
def test_committed_gpu_reports_are_strict_json_and_valid(path: Path) -> None:
    report = strict_json(path)
    validate(report)
    assert report["run"]["device"].startswith("NVIDIA H") and "RANDOM" in report["run"]["weights"]


def test_their_data_file_shape_runs_with_an_image_root(tmp_path, monkeypatch) -> None:
    """Their layout: relative `../../LMUData/images/COCO/<id>.jpg` paths, written for another cwd."""
    images = tmp_path / "store" / "LMUData" / "images" / "COCO"
    images.mkdir(parents=True)
    sample = load_data_file(SAMPLE_DATA)
    items = []
    for i, s in enumerate(sample.samples[:2]):
        source = SAMPLE_DATA.parent / s.image_paths[0]
        (images / f"{9 + i}.jpg").write_bytes(source.read_bytes())
        rel = f"../../LMUData/images/COCO/{9 + i}.jpg"
        items.append({"index": 9 + i, "image_id": 9 + i, "dataset": "COCO_VAL", "image_paths": [rel],
                      "text_prompt": s.text_prompt, "prompt_struct": [{"type": "image", "value": rel},
                                                                      {"type": "text", "value": s.text_prompt}]})  # fmt: skip
    data = tmp_path / "perf_data" / "coco_val_2.json"
    data.parent.mkdir()
    data.write_text(json.dumps({"meta": {"dataset": "COCO_VAL", "n": 2, "seed": 42}, "data": items}))
    monkeypatch.chdir(tmp_path)  # from here the ../../ paths point nowhere
    out = tmp_path / "report.json"
    assert cli_main(["bench", "--data-file", str(data), "--image-root", str(tmp_path / "store" / "LMUData"),
                     "--report-file", str(out), "--max-new-tokens", "2", "--no-progress", "--no-plots"]) == 0  # fmt: skip
    report = strict_json(out)
    assert report["meta"] == {"dataset": "COCO_VAL", "n": 2, "seed": 42}  # copied from their file
    assert [s["index"] for s in report["modes"]["stock"]["samples"] if not s["failed"]] == [9, 10]


def test_a_batch_that_runs_out_of_memory_is_retried_in_halves(tmp_path, monkeypatch) -> None:
    real = bench_run.run_batch

    def oom_above_one(model, mode, samples, *args, **kwargs):
        if len(samples) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (planted)")
        return real(model, mode, samples, *args, **kwargs)

    monkeypatch.setattr(bench_run, "run_batch", oom_above_one)
    _, rows, _ = bench_run.run(_cfg(tmp_path, limit=2, batch_size=2, modes="stock"), ["test"])
    assert [(r["index"], r["failed"], r.get("oom_retries")) for r in rows] == [(0, False, 1), (1, False, 1)]


def test_stock_variants_take_only_the_decode_and_row_kernel_switches() -> None:
    modes = bench_run.parse_modes("stock,stock-dynamic:decode=dynamic,dymu:decode=static,dymu-g:decode=graph",
                                  "fast", None)  # fmt: skip
    assert [(m.kind, m.options.decode if m.options else None) for m in modes] == [
        ("stock", None), ("stock", "dynamic"), ("dymu", "static"), ("dymu", "graph")]  # fmt: skip
    with pytest.raises(DymuError, match="decode='beam'"):
        bench_run.parse_modes("dymu:decode=beam", "fast", None)
    with pytest.raises(DymuError, match="unknown option"):
        bench_run.parse_modes("stock-x:vtu=none", "fast", None)
    stock, dymu = bench_run.parse_modes(
        "stock-p:decode=graph;rows=off,dymu-p:rows=off;remerge=on", "fast", None
    )
    assert (stock.options.decode, stock.options.fused_rows, stock.options.fused_rope) == (
        "graph",
        False,
        True,
    )
    assert (dymu.options.fused_rows, dymu.options.fused_remerge, dymu.options.fused_rope) == (
        False,
        True,
        True,
    )
    (uncompiled,) = bench_run.parse_modes("dymu-u:compile=off", "fast", None)
    assert uncompiled.options == Options(compile_tower=False)
    (copied,) = bench_run.parse_modes("dymu-c:sink=off", "fast", None)
    assert copied.options == Options(kv_sink=False)
    (stock_copied,) = bench_run.parse_modes("stock-c:sink=off", "fast", None)
    assert stock_copied.kind == "stock" and stock_copied.options == Options(kv_sink=False)
    with pytest.raises(DymuError, match="unknown option"):
        bench_run.parse_modes("stock-x:compile=off", "fast", None)  # stock LLaVA runs HF's CLIP
    with pytest.raises(DymuError, match="unknown option"):
        bench_run.parse_modes("stock-x:remerge=off", "fast", None)  # stock LLaVA has no remerge
    with pytest.raises(DymuError, match="on or off"):
        bench_run.parse_modes("dymu-x:rows=no", "fast", None)


def test_a_modes_switches_reach_its_prefill(tmp_path, monkeypatch) -> None:
    """`graphs=` / `fused=` of one mode must reach that mode's tower and VTU, not only its decode."""
    seen: list[tuple[bool, bool]] = []
    real = bench_run.prepare

    def recording(*args, **kwargs):
        options = args[5]
        seen.append((options.cuda_graphs, options.fused_rope))
        return real(*args, **kwargs)

    monkeypatch.setattr(bench_run, "prepare", recording)
    modes = "dymu-a:graphs=on;fused=off,dymu-b:graphs=off;fused=on"
    bench_run.run(_cfg(tmp_path, modes=modes, limit=1, warmup=0), ["test"])
    assert set(seen) == {(True, False), (False, True)}


def test_every_batch_starts_without_idle_compile_workers(tmp_path, monkeypatch) -> None:
    """Each batch first stops inductor's compile workers (left by any earlier compile), before its clock."""
    events: list[str] = []
    real_start = bench_run.StageClock.start
    monkeypatch.setattr(bench_run, "release_compile_workers", lambda: events.append("release"))
    monkeypatch.setattr(
        bench_run.StageClock, "start", lambda self: (events.append("start"), real_start(self))[1]
    )
    bench_run.run(_cfg(tmp_path, modes="stock,dymu", limit=2, warmup=0), ["test"])
    assert events and events == ["release", "start"] * (len(events) // 2)


def test_release_compile_workers_shuts_down_inductors_pools_only_if_loaded(monkeypatch) -> None:
    calls = []
    fake = types.ModuleType("torch._inductor.async_compile")
    fake.shutdown_compile_workers = lambda: calls.append(1)
    monkeypatch.setitem(sys.modules, "torch._inductor.async_compile", fake)
    release_compile_workers()
    assert calls == [1]
    monkeypatch.delitem(sys.modules, "torch._inductor.async_compile")
    release_compile_workers()  # not imported: nothing to stop, and nothing gets imported
    assert "torch._inductor.async_compile" not in sys.modules and calls == [1]
