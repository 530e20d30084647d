"""Latency measurement: CUDA events + synchronize on GPU, perf_counter on CPU, after warmup.

Candidates are interleaved (a, b, a, b, ...) so drift on a shared machine hits both alike.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def summarize(samples_ms: list[float]) -> dict[str, float]:
    """mean / p50 / p90 / p99 / min of a list of milliseconds."""
    ordered = sorted(samples_ms)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "mean_ms": statistics.fmean(ordered),
        "p50_ms": pct(0.5),
        "p90_ms": pct(0.9),
        "p99_ms": pct(0.99),
        "min_ms": ordered[0],
        "n": len(ordered),
    }


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_side_by_side(
    candidates: dict[str, Callable[[], object]], device: torch.device, warmup: int = 3, repeats: int = 10
) -> dict[str, dict[str, float]]:
    """Time each callable `repeats` times, interleaved, after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            samples[name].append(_time_once(fn, device))
    return {name: summarize(values) for name, values in samples.items()}


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory (MiB) allocated while running `fn` once; None on CPU."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def device_name(device: torch.device) -> str:
    """The card (e.g. 'NVIDIA H200') or the CPU's description."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
