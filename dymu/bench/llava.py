"""LLaVA-1.5 benchmark: stock vs DyMU side by side, per stage (docs/architecture.md, "Benchmark protocol").

Stages: vision tower, prefill (LLM only: stock full-length forward vs fast-VTU prefill
into a cache), decode (ms/token from each prefilled cache), end to end (generate with a
fixed number of new tokens). Weights are RANDOM (seeded): timings only.

Run: `python -m dymu.bench.llava --size full --device cuda` (LLaVA-1.5-7B architecture)
or `--size small` on a CPU.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import transformers

from ..calibration import calibrate
from ..compat.shims import cache_keyword, cache_length, new_cache, rope_theta
from ..errors import run_main
from ..families import FAMILIES, IMAGE
from ..families.hf import stock_inputs
from ..generation import generate_prepared, prepare
from ..images import preprocess
from ..testing.builders import LLAMA_SIZES, clip_processor, random_llava
from ..testing.photos import bench_images
from ..tower import encode_images
from ..vtu import vtu_prefill
from . import bench_dtype, bench_parser, emit
from .timing import device_name, peak_memory_mb, time_side_by_side


def prompt_ids(batch: int, text_tokens: int, seed: int = 0) -> list[list[int]]:
    """Synthetic prompts: `text_tokens` random ids around one image placeholder."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):  # equal lengths: prefill timings compare unpadded work
        ids = torch.randint(3, 31000, (text_tokens,), generator=gen).tolist()
        out.append([1, *ids[:20], IMAGE, *ids[20:]])
    return out


def run(size: str = "small", device: str = "cpu", dtype: str = "float32", batch_sizes=(1, 8),
        target_tokens: int = 72, text_tokens: int = 40, new_tokens: int = 32, repeats: int = 5,
        warmup: int = 2, profile: bool = False, model: torch.nn.Module | None = None,
        thresholds: torch.Tensor | None = None) -> dict[str, Any]:  # fmt: skip
    """Every stage for stock and DyMU-fast at each batch size.

    `model` / `thresholds`: reuse a model already built (and thresholds already calibrated)
    instead of building and calibrating here (the matrix's full-size GPU stage does).
    """
    dev, torch_dtype = torch.device(device), getattr(torch, dtype)
    model = model if model is not None else random_llava(size, dev, torch_dtype)
    parts = FAMILIES["hf"].parts(model)
    processor = clip_processor(336)
    tau = thresholds
    if tau is None:
        tau = calibrate(parts.vision, bench_images(64, seed=1), target_tokens, batch_size=32,
                        processor=processor, progress=False)  # fmt: skip
    images = bench_images(max(batch_sizes), seed=2)
    theta = rope_theta(parts.decoder.config)
    rows = []
    for bsz in batch_sizes:
        ids = prompt_ids(bsz, text_tokens)
        pixels = preprocess(images[:bsz], processor).to(dev, torch_dtype)
        stock_in = stock_inputs(parts, ids, pixels)
        prepared = prepare(parts, ids, pixels, tau)
        full_embeds = _stock_embeds(parts, ids, pixels)
        merged, idx = _merged(parts, ids, pixels, tau)

        full_mask = torch.ones(full_embeds.shape[:2], dtype=torch.long, device=dev)

        def stock_prefill(e=full_embeds, m=full_mask):
            with torch.no_grad():
                out = parts.decoder(inputs_embeds=e, attention_mask=m, use_cache=True)
                return parts.lm_head(out.last_hidden_state[:, -1])

        def dymu_prefill(e=merged, i=idx):
            out = vtu_prefill(parts.decoder, e, i, theta)
            cache = new_cache(model, out.keys, out.values)
            return parts.lm_head(out.hidden[:, -1]), cache

        def stock_e2e(inputs=stock_in):
            with torch.no_grad():
                return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=0)  # fmt: skip

        def dymu_e2e(ids=ids, pixels=pixels):
            batch = prepare(parts, ids, pixels, tau)
            return generate_prepared(parts, batch, new_tokens, min_new_tokens=new_tokens)

        stages = {
            "vision": time_side_by_side(
                {
                    "stock": lambda p=pixels: _stock_tower(parts, p),
                    "dymu": lambda p=pixels: encode_images(parts.vision, p, tau),
                },
                dev,
                warmup,
                repeats,
            ),
            "prefill": time_side_by_side(
                {"stock": stock_prefill, "dymu": dymu_prefill}, dev, warmup, repeats
            ),
            "e2e": time_side_by_side({"stock": stock_e2e, "dymu": dymu_e2e}, dev, 1, max(2, repeats // 2)),
        }
        decode = {
            "stock": _decode_ms_per_token(model, stock_in, None, new_tokens, dev),
            "dymu": _decode_ms_per_token(model, stock_in, prepared, new_tokens, dev),
        }
        if profile:
            _profile({"stock": stock_prefill, "dymu": dymu_prefill}, bsz)
        memory = {
            "prefill": {
                "stock": peak_memory_mb(stock_prefill, dev),
                "dymu": peak_memory_mb(dymu_prefill, dev),
            }
        }
        rows.append({
            "batch_size": bsz,
            "visual_tokens": {"mean": sum(prepared.visual_tokens) / bsz, "min": min(prepared.visual_tokens),
                              "max": max(prepared.visual_tokens)},
            "virtual_length": int(prepared.attention_mask.shape[1]),
            "stages": stages,
            "decode_ms_per_token": decode,
            "peak_memory_mb": memory,
            "ratios_stock_over_dymu": {k: v["stock"]["mean_ms"] / v["dymu"]["mean_ms"] for k, v in stages.items()}
            | {"decode": decode["stock"] / decode["dymu"]},
        })  # fmt: skip
    return {
        "benchmark": "llava", "size": size, "weights": "random (seeded); timings only, no accuracy meaning",
        "device": device_name(dev), "dtype": dtype, "torch": torch.__version__,
        "transformers": transformers.__version__, "target_tokens": target_tokens, "new_tokens": new_tokens,
        "vtu": "fast", "rows": rows,
    }  # fmt: skip


def _profile(candidates: dict[str, Any], bsz: int) -> None:
    """Print the top CUDA kernels of each prefill (where the time goes)."""
    for name, fn in candidates.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        print(f"--- {name} prefill, batch {bsz}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def _stock_tower(parts, pixels):
    with torch.no_grad():
        return parts.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]


@torch.no_grad()
def _stock_embeds(parts, ids: list[list[int]], pixels: torch.Tensor) -> torch.Tensor:
    """The full-length input embeddings stock LLaVA feeds its decoder (all 576 image rows per
    image), built here so the stock prefill is the same on every transformers version."""
    feats = parts.projector(_stock_tower(parts, pixels))
    rows = []
    for b, row in enumerate(ids):  # equal text lengths: no padding needed
        k = row.index(IMAGE)
        text = parts.decoder.embed_tokens(torch.tensor(row[:k] + row[k + 1 :], device=pixels.device))
        rows.append(torch.cat([text[:k], feats[b].to(text.dtype), text[k:]]))
    return torch.stack(rows)


@torch.no_grad()
def _merged(parts, ids, pixels, tau):
    """Merged sequence and virtual index, as prepare() builds them (no padding: equal text lengths)."""
    tower = encode_images(parts.vision, pixels, tau)
    proj = parts.projector(tower.padded)
    rows, idx = [], []
    for b, row in enumerate(ids):
        k = row.index(IMAGE)
        text = parts.decoder.embed_tokens(torch.tensor(row[:k] + row[k + 1 :], device=pixels.device))
        n_m = int(tower.num_tokens[b])
        rows.append(torch.cat([text[:k], proj[b, :n_m], text[k:]]))
        idx.append(torch.cat([torch.arange(k, device=pixels.device), k + tower.mapping[b],
                              k + n_m + torch.arange(len(row) - k - 1, device=pixels.device)]))  # fmt: skip
    width = max(len(r) for r in rows)
    merged = torch.zeros(len(rows), width, rows[0].shape[-1], dtype=rows[0].dtype, device=pixels.device)
    vwidth = max(len(i) for i in idx)
    index = torch.zeros(len(rows), vwidth, dtype=torch.long, device=pixels.device)
    for b, (r, i) in enumerate(zip(rows, idx, strict=True)):  # right-aligned; prefill timing only
        merged[b, width - len(r) :] = r
        index[b, vwidth - len(i) :] = i + (width - len(r))
    return merged, index


@torch.no_grad()
def _decode_ms_per_token(model, stock_in, prepared, steps: int, dev: torch.device) -> float:
    """Mean ms per decode step from a prefilled cache (stock: the model's own prefill)."""
    if prepared is None:
        out = model(**stock_in, use_cache=True)
        cache = out.past_key_values  # before 4.47 the model expands the image itself: size from the cache
        mask = torch.ones(stock_in["input_ids"].shape[0], cache_length(cache), dtype=torch.long, device=dev)
        token = out.logits[:, -1:].argmax(-1)
    else:
        # the cache holds all but the last prompt token: the first step feeds that token
        cache, mask = prepared.cache, prepared.attention_mask[:, :-1]
        token = prepared.virtual_ids[:, -1:]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        position = mask.sum(-1, keepdim=True) - 1
        out = model(input_ids=token, attention_mask=mask, position_ids=position, use_cache=True,
                    **{cache_keyword(): cache})  # fmt: skip
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return (time.perf_counter() - start) * 1e3 / steps


def format_table(report: dict[str, Any]) -> str:
    lines = [f"llava bench: {report['size']}, {report['dtype']}, {report['device']}, torch {report['torch']}, "
             f"transformers {report['transformers']} ({report['weights']})",
             f"{'batch':>5} {'vis tok':>8} {'stage':>8} {'stock ms':>10} {'dymu ms':>10} {'stock/dymu':>11}"]  # fmt: skip
    for row in report["rows"]:
        for stage, cand in row["stages"].items():
            lines.append(f"{row['batch_size']:>5} {row['visual_tokens']['mean']:>8.1f} {stage:>8} "
                         f"{cand['stock']['mean_ms']:>10.2f} {cand['dymu']['mean_ms']:>10.2f} "
                         f"{row['ratios_stock_over_dymu'][stage]:>10.2f}x")  # fmt: skip
        d = row["decode_ms_per_token"]
        lines.append(f"{row['batch_size']:>5} {'':>8} {'decode':>8} {d['stock']:>10.2f} {d['dymu']:>10.2f} "
                     f"{d['stock'] / d['dymu']:>10.2f}x  (ms/token)")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("python -m dymu.bench.llava", __doc__.splitlines()[0], repeats=5)
    parser.add_argument("--size", choices=sorted(LLAMA_SIZES), default="small")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of each prefill")
    args = parser.parse_args(argv)
    report = run(args.size, args.device, bench_dtype(args), tuple(args.batch_sizes), args.target_tokens,
                 new_tokens=args.new_tokens, repeats=args.repeats, profile=args.profile)  # fmt: skip
    return emit(report, format_table(report), args.out)


if __name__ == "__main__":
    run_main(main)
