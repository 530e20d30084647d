"""`dymu bench`: the user's benchmark (their data files, their report keys), stock and DyMU side
by side in one process, interleaved batch by batch so drift on a shared machine hits every mode
alike. Rows stream to a JSONL file as they finish (what `--resume` continues from); the report
is rebuilt from those rows at the end, on Ctrl-C, and after a failed batch.

Both modes decode through the same path (the model's own `generate` from a prefilled cache);
they differ only in the prefill: `stock_prepare` (HF CLIP, 576 image rows, the decoder's own
forward) or `prepare` (DToMe + VTU).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image
from tqdm import tqdm
from transformers import AutoTokenizer, LogitsProcessorList

from ..api import DymuLlava, apply, format_prompt, load
from ..calibration import calibrate, default_target_tokens
from ..cuda_graph import capture_count, release_compile_workers
from ..devices import device_from, dtype_from
from ..errors import DymuError
from ..generation import PreparedBatch, decode_path, generate_prepared, prepare, sink_tokens, stock_prepare
from ..images import load_image
from ..jsonsafe import dumps
from ..matrix.digest import code_digest
from ..options import Options
from ..prefill_graph import capture_count as prefill_captures
from ..testing.builders import clip_processor, random_llava
from ..testing.tiny import ensure_tiny_checkpoints
from ..thresholds import load_thresholds, save_thresholds
from .clock import StageClock, StepRecorder
from .data import (
    SAMPLE_DATA,
    SAMPLE_MMBENCH,
    SAMPLE_SHAPES,
    SAMPLE_SHAPES_COCO,
    DataFile,
    Sample,
    load_data_file,
    resolve_image,  # fmt: skip
)
from .timing import device_name

SCHEMA_VERSION = 1
RANDOM_PREFIX = "random:"
RANDOM_MODELS = ("llava-1.5-7b", "llava-1.5-small")
TINY = {"tiny": "llava-hf-tiny-safetensors", "tiny-legacy": "llava-v1.5-tiny-safetensors"}
DATA_ALIASES = {"sample": SAMPLE_DATA, "sample-mmbench": SAMPLE_MMBENCH,  # packaged with dymu
                "sample-shapes": SAMPLE_SHAPES, "sample-shapes-coco": SAMPLE_SHAPES_COCO}  # fmt: skip


def data_path(name: str) -> Path:
    """`--data-file`: a path, or `sample` / `sample-mmbench` (the packaged photos and prompts) /
    `sample-shapes` / `sample-shapes-coco` (the tiny model's task)."""
    return DATA_ALIASES.get(name, Path(name))


def default_data(model_path: str) -> str:
    """The data a run uses when none is named: the task the embedded tiny model was trained on, as
    captions (its short answers are scored by exact match, no optional scorer needed; it never
    learned MMBench's option letters), else the packaged photos."""
    return "sample-shapes-coco" if model_path in TINY else "sample"


@dataclass
class Mode:
    """One way of running the model: stock, or DyMU with its thresholds and VTU mode."""

    name: str
    kind: str  # "stock" | "dymu"
    vtu: str = "fast"
    thresholds_file: str | None = None
    thresholds: torch.Tensor | None = field(default=None, repr=False)
    options: Options | None = None  # None: the model's own
    decode_given: bool = False


MODE_KEYS = ("vtu", "thresholds", "graphs", "compile", "fused", "rows", "remerge", "sink", "decode", "segment",
             "prefill_graph")  # fmt: skip
# stock LLaVA's decode runs through dymu's graph step (and its buffer) too
STOCK_KEYS = ("decode", "rows", "sink")


def parse_modes(spec: str, default_vtu: str, default_thresholds: str | None) -> list[Mode]:
    """`stock,dymu,dymu-none:vtu=none,dymu-b:thresholds=b.pth,dymu-eager:graphs=off` -> modes (names
    unique; `stock` and `stock-*` are stock LLaVA); `graphs` / `compile` / `fused` / `rows` / `remerge`
    / `sink` switch the tower's CUDA graphs / its compiled blocks / VTU's fused RoPE / the fused
    norms and SiLU*up / the fused remerge / the prefill into the decode buffer for one mode,
    `decode=graph|static|dynamic` its decode path,
    `segment=N` the tower's blocks per captured graph (0: all), `prefill_graph=N` the largest batch
    whose prefill is graphed."""
    modes: list[Mode] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, opts = part.partition(":")
        kind = "stock" if name == "stock" or name.startswith("stock-") else "dymu"
        mode = Mode(name, kind, default_vtu, default_thresholds if kind == "dymu" else None)
        for opt in filter(None, opts.split(";")):
            key, _, value = opt.partition("=")
            if key not in MODE_KEYS or not value or (kind == "stock" and key not in STOCK_KEYS):
                raise DymuError(f"--modes: {part!r}: unknown option {opt!r}; use NAME:{'|'.join(MODE_KEYS)}=VALUE "
                                "(several joined by ';')")  # fmt: skip
            if key == "vtu":
                mode.vtu = value
            elif key == "thresholds":
                mode.thresholds_file = value
            elif key == "decode":
                mode.options = replace(mode.options or Options(), decode=value)
                mode.decode_given = True
            elif key in ("segment", "prefill_graph"):
                if not value.isdigit():
                    raise DymuError(f"--modes: {part!r}: {key} must be a whole number (0: see dymu.Options)")
                field_name = {"segment": "graph_segment", "prefill_graph": "prefill_graph_batch"}[key]
                mode.options = replace(mode.options or Options(), **{field_name: int(value)})
            elif value not in ("on", "off"):
                raise DymuError(f"--modes: {part!r}: {key} must be on or off")
            else:
                field_name = {"graphs": "cuda_graphs", "fused": "fused_rope", "rows": "fused_rows",
                              "remerge": "fused_remerge", "sink": "kv_sink", "compile": "compile_tower"}[key]  # fmt: skip
                mode.options = replace(mode.options or Options(), **{field_name: value == "on"})
        if any(m.name == name for m in modes):
            raise DymuError(f"--modes: {name!r} given twice; give each variant its own name")
        modes.append(mode)
    if not modes:
        raise DymuError("--modes: no modes given; e.g. --modes stock,dymu")
    return modes


@dataclass
class BenchConfig:
    model_path: str = "tiny"
    data_file: str | None = None
    max_new_tokens: int = 64
    report_file: str = "report_dymu.json"
    thresholds: str | None = None
    modes: str = "stock,dymu"
    vtu: str = "fast"
    batch_size: int = 1
    limit: int | None = None
    offset: int = 0
    warmup: int = 1
    seed: int = 0
    temperature: float = 0.0
    image_root: str | None = None
    resume: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    ignore_eos: bool = False
    decode: str = "auto"
    conv_mode: str = "llava_v1"
    target_tokens: int | None = None
    calibration_images: int = 64
    progress: bool = True

    def settings(self) -> dict[str, Any]:
        """What must match for `--resume` to continue a run (not where the report goes)."""
        keep = ("model_path", "max_new_tokens", "thresholds", "modes", "vtu", "batch_size", "limit", "offset",
                "seed", "temperature", "image_root", "device", "dtype", "ignore_eos", "decode", "conv_mode", "target_tokens")  # fmt: skip
        return {k: v for k, v in asdict(self).items() if k in keep}


def load_target(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> tuple[DymuLlava, str]:
    """The model to benchmark and what its weights are ("random ..." makes accuracy meaningless)."""
    if cfg.model_path in TINY:
        path = ensure_tiny_checkpoints()[TINY[cfg.model_path]]
        what = ("the embedded tiny model, trained on the shapes task (its accuracy means something on the "
                "sample-shapes data only; timings of a toy)")  # fmt: skip
        return load(path, dtype=dtype, device=str(device)), what
    if cfg.model_path.startswith(RANDOM_PREFIX):
        arch = cfg.model_path[len(RANDOM_PREFIX) :]
        if arch not in RANDOM_MODELS:
            raise DymuError(
                f"--model-path {cfg.model_path}: unknown architecture; use random:{RANDOM_MODELS[0]}"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(ensure_tiny_checkpoints()[TINY["tiny"]]))
        image_token = tokenizer.convert_tokens_to_ids("<image>")
        model = random_llava(
            "full" if arch.endswith("7b") else "small", device, dtype, image_token_index=image_token
        )
        return (apply(model, None, tokenizer=tokenizer, image_processor=clip_processor(336)),
                f"RANDOM weights ({arch} architecture, seeded; the tiny model's tokenizer): timings only")  # fmt: skip
    return load(cfg.model_path, dtype=dtype, device=str(device)), "as loaded from the checkpoint"


def _images(sample: Sample, data: DataFile, image_root: Path | None) -> list[Image.Image]:
    return [load_image(resolve_image(p, data.path, image_root)) for p in sample.image_paths]


def _thresholds_for(mode: Mode, model: DymuLlava, cfg: BenchConfig, data: DataFile, image_root: Path | None,
                    out_dir: Path) -> torch.Tensor | None:  # fmt: skip
    """A mode's thresholds: its file, else calibrated here on the data's own images (and saved)."""
    if mode.kind == "stock":
        return None
    layers = model.parts.vision.config.num_hidden_layers
    if mode.thresholds_file:
        return load_thresholds(mode.thresholds_file, num_layers=layers)
    patches = (model.parts.vision.config.image_size // model.parts.vision.config.patch_size) ** 2
    target = cfg.target_tokens or default_target_tokens(patches)
    images = []
    for sample in data.samples:
        if len(images) >= cfg.calibration_images:
            break
        try:
            images += _images(sample, data, image_root)
        except DymuError:
            continue
    if not images:
        raise DymuError(f"{data.path}: no readable images to calibrate thresholds on; pass --thresholds FILE")
    pixels = model.pixel_values(images).to(
        model.parts.vision.device, next(model.parts.vision.parameters()).dtype
    )
    tau = calibrate(model.parts.vision, pixels, target, batch_size=32, feature_layer=model.parts.feature_layer,
                    progress=False)  # fmt: skip
    mode.thresholds_file = str(out_dir / f"thresholds_{mode.name}.safetensors")
    save_thresholds(mode.thresholds_file, tau, target_tokens=target, num_calibration_images=len(images),
                    dataset_fingerprint=data.sha256, source_model=cfg.model_path)  # fmt: skip
    return tau


def _count_new(row: list[int], eos: set[int], pad: int | None, ignore_eos: bool) -> int:
    """New tokens generated, identical in every mode: up to and including the first EOS."""
    if not ignore_eos:
        for i, t in enumerate(row):
            if t in eos:
                return i + 1
    n = len(row)
    while pad is not None and n and row[n - 1] == pad and pad not in eos and not ignore_eos:
        n -= 1
    return n


def _graph_captures(model: DymuLlava) -> int:
    """CUDA graphs captured so far for this model (tower and prefill): the difference over a batch
    is what its timings paid for captures."""
    return capture_count(model.parts.vision) + prefill_captures(model.parts.decoder)


def run_batch(model: DymuLlava, mode: Mode, samples: list[Sample], images: list[Image.Image], cfg: BenchConfig,
              device: torch.device, batch_index: int) -> list[dict[str, Any]]:  # fmt: skip
    """One batch in one mode: stage edges, every step, counts and memory; one row per sample."""
    # a compile in an earlier batch (our tower; transformers' static decode) leaves inductor's worker
    # processes idling for a minute, and they slow this batch's host work (preprocessing 15x on an H100 host)
    release_compile_workers()
    clock = StageClock(device)
    options = mode.options or model.options  # one mode's switches reach its tower, VTU and decode
    captures = _graph_captures(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock.start()
    prompts = [format_prompt(s.text_prompt, cfg.conv_mode) for s in samples]
    ids = [model.tokenize(p) for p in prompts]
    pixels = model.pixel_values(images).to(device)
    clock.host_mark("preprocess")
    clock.mark("start")
    gen: dict[str, Any] = {
        "logits_processor": LogitsProcessorList([StepRecorder(clock)]),
        "output_scores": False,
    }
    if cfg.temperature > 0:
        torch.manual_seed(cfg.seed + batch_index)
        gen.update(do_sample=True, temperature=cfg.temperature, top_p=1.0, top_k=0)
    if cfg.ignore_eos:
        gen["min_new_tokens"] = cfg.max_new_tokens
    decode = decode_path(model.parts, options, gen)[0]
    batch: PreparedBatch
    sink = sink_tokens(model.parts, options, gen, cfg.max_new_tokens)
    if mode.kind == "stock":
        batch = stock_prepare(
            model.parts, ids, pixels, on_stage=clock.mark, decode_tokens=sink, options=options
        )
    else:  # decoded before the next prepare, as `DymuLlava.generate` does
        batch = prepare(model.parts, ids, pixels, mode.thresholds, mode.vtu, options, on_stage=clock.mark,
                        borrow=True, decode_tokens=sink)  # fmt: skip
    clock.mark("prefill")
    out = generate_prepared(model.parts, batch, cfg.max_new_tokens, options, **gen)
    clock.host_mark("end")
    captures = _graph_captures(model) - captures
    vision_ms, prefill_ms = clock.between("start", "vision"), clock.between("vision", "prefill")
    gaps = clock.step_gaps()
    eos, pad = model.eos_ids(), getattr(model.tokenizer, "pad_token_id", None)
    new = out.sequences[:, batch.virtual_ids.shape[1] :].tolist()
    rows = []
    for b, sample in enumerate(samples):
        n_out = _count_new(new[b], eos, pad, cfg.ignore_eos)
        itl = gaps[: max(0, n_out - 1)]
        e2e, ttft = clock.host["end"], clock.host["first_token"]
        per_layer = batch.tower.tokens_per_layer[b].tolist() if batch.tower is not None else None
        rows.append({
            "type": "sample", "mode": mode.name, "index": sample.index, "batch": batch_index, "batch_size": len(samples),
            "failed": False, "text": model.tokenizer.decode(new[b][:n_out], skip_special_tokens=True).strip(),
            "token_ids": new[b][:n_out], "out_len": n_out, "text_tokens": len(ids[b]) - 1,
            "visual_tokens": batch.visual_tokens[b], "in_len": len(ids[b]) - 1 + batch.visual_tokens[b],
            "virtual_len": int(batch.attention_mask[b].sum()), "per_layer_tokens": per_layer,
            "e2e": e2e, "ttft": ttft, "tbt": (sum(itl) / len(itl) / 1e3) if itl else None,
            "stages_ms": {"preprocess": clock.host["preprocess"] * 1e3, "vision": vision_ms, "prefill": prefill_ms,
                          "first_step": clock.first_step_ms("prefill"), "ttft": ttft * 1e3,
                          "tpot": (sum(itl) / len(itl)) if itl else None, "e2e": e2e * 1e3},
            "itl_ms": itl, "graph_captures": captures, "decode": decode,
            "vram": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            "vram_reserved": torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None,
        })  # fmt: skip
    return rows


def run_batch_with_oom_retry(model: DymuLlava, mode: Mode, samples: list[Sample], images: list[Image.Image],
                             cfg: BenchConfig, device: torch.device, batch_index: int) -> list[dict[str, Any]]:  # fmt: skip
    """A batch that runs out of GPU memory is retried as two halves (recorded in each row)."""
    try:
        return run_batch(model, mode, samples, images, cfg, device, batch_index)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        if len(samples) == 1:
            raise
        half = len(samples) // 2
        rows = []
        for part in ((samples[:half], images[:half]), (samples[half:], images[half:])):
            rows += run_batch_with_oom_retry(model, mode, *part, cfg, device, batch_index)
        for row in rows:
            row["oom_retries"] = row.get("oom_retries", 0) + 1
        return rows


def _failed_row(mode: Mode, sample: Sample, error: str, batch_index: int) -> dict[str, Any]:
    return {"type": "sample", "mode": mode.name, "index": sample.index, "batch": batch_index, "failed": True,
            "error": error}  # fmt: skip


def _batches(samples: list[Sample], size: int) -> Iterator[list[Sample]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def jsonl_path(report_file: Path) -> Path:
    return report_file.with_suffix(".jsonl")


def _read_rows(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The header and the finished rows of a JSONL file (a torn last line is dropped)."""
    header, rows = None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("type") == "settings":
            header = row
        elif row.get("type") == "sample":
            rows.append(row)
    return header, rows


def run_info(cfg: BenchConfig, data: DataFile, device: torch.device, weights: str, modes: list[Mode],
             argv: list[str]) -> dict[str, Any]:  # fmt: skip
    return {
        "argv": argv, "settings": cfg.settings(), "data_file": str(data.path), "data_sha256": data.sha256,
        "weights": weights, "device": device_name(device), "dtype": cfg.dtype, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "code_revision": code_digest(),
        "modes": [{"name": m.name, "kind": m.kind, "vtu": m.vtu, "thresholds": m.thresholds_file,
                   "options": asdict(m.options) if m.options else None} for m in modes],
        "timing": "CUDA events at stage edges, synchronised once per batch; TTFT and e2e are host times after "
        "synchronising" if device.type == "cuda" else "perf_counter on the CPU (synchronous)",
        "batch_kind": "latency (batch 1)" if cfg.batch_size == 1 else f"throughput (batch {cfg.batch_size}, "
        "per-sample times are the batch's)",
    }  # fmt: skip


def run(cfg: BenchConfig, argv: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
    """Run (or resume) the benchmark; returns (run info, every row, interrupted)."""
    device, dtype = device_from(cfg.device), dtype_from(cfg.dtype)
    if cfg.max_new_tokens < 1 or cfg.batch_size < 1 or cfg.warmup < 0 or cfg.offset < 0:
        raise DymuError("--max-new-tokens and --batch-size must be >= 1, --warmup and --offset >= 0")
    data = load_data_file(data_path(cfg.data_file or default_data(cfg.model_path)))
    image_root = Path(cfg.image_root) if cfg.image_root else None
    report_file = Path(cfg.report_file)
    stream = jsonl_path(report_file)
    samples = data.samples[cfg.offset :]
    samples = samples[: cfg.limit] if cfg.limit is not None else samples
    done: set[tuple[str, str]] = set()
    rows: list[dict[str, Any]] = []
    if cfg.resume and stream.is_file():
        header, rows = _read_rows(stream)
        if header is None or header["settings"] != cfg.settings() or header["data_sha256"] != data.sha256:
            raise DymuError(f"{stream}: written by a run with other settings or data; rerun without --resume "
                            "or with the same arguments")  # fmt: skip
        done = {(r["mode"], str(r["index"])) for r in rows}
    elif stream.exists() and not cfg.resume:
        stream.unlink()
    modes = parse_modes(cfg.modes, cfg.vtu, cfg.thresholds)
    model, weights = load_target(cfg, device, dtype)
    model.options = replace(model.options, decode=cfg.decode)
    for mode in modes:  # a mode's own switches apply on top of the run's --decode
        if mode.options is not None and not mode.decode_given:
            mode.options = replace(mode.options, decode=cfg.decode)
    report_file.parent.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        mode.thresholds = _thresholds_for(mode, model, cfg, data, image_root, report_file.parent)
    info = run_info(cfg, data, device, weights, modes, argv)
    with stream.open("a", encoding="utf-8") as out:
        if not done:
            out.write(dumps({"type": "settings", "settings": cfg.settings(), "data_sha256": data.sha256,
                                 "run": info}) + "\n")  # fmt: skip
        warm = [data.samples[i % len(data.samples)] for i in range(cfg.warmup * cfg.batch_size)]
        for (
            mode
        ) in modes:  # warm-up batches at the timed batch size: kernels, allocator, graphs; never reported
            for chunk in _batches(warm, cfg.batch_size):
                try:
                    run_batch_with_oom_retry(model, mode, chunk, [i for s in chunk for i in _images(s, data, image_root)], cfg,
                              device, -1)  # fmt: skip
                except DymuError:
                    continue
        todo = [b for b in _batches(samples, cfg.batch_size)]
        bar = tqdm(total=len(samples), desc="bench", unit="sample", disable=not cfg.progress, file=sys.stderr)
        try:
            for batch_index, chunk in enumerate(todo):
                ready, images = [], []
                for sample in chunk:
                    try:
                        images += _images(sample, data, image_root)
                        ready.append(sample)
                    except DymuError as err:
                        for mode in modes:
                            if (mode.name, str(sample.index)) not in done:
                                row = _failed_row(mode, sample, str(err), batch_index)
                                rows.append(row)
                                out.write(dumps(row) + "\n")
                for mode in modes:  # interleaved: every mode runs each batch before the next batch
                    pending = [s for s in ready if (mode.name, str(s.index)) not in done]
                    if not pending:
                        continue
                    picks = [images[ready.index(s)] for s in pending]
                    try:
                        new_rows = run_batch_with_oom_retry(
                            model, mode, pending, picks, cfg, device, batch_index
                        )
                    except (DymuError, RuntimeError) as err:
                        new_rows = [_failed_row(mode, s, f"{type(err).__name__}: {err}"[:300], batch_index)
                                    for s in pending]  # fmt: skip
                    for row in new_rows:
                        rows.append(row)
                        out.write(dumps(row) + "\n")
                    out.flush()
                bar.update(len(chunk))
        except KeyboardInterrupt:
            bar.close()
            return info, rows, True
        bar.close()
    return info, rows, False


def time_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
