"""`python -m dymu.bench.tower` (the vision-tower benchmark) on the CPU: its own images or a data file's."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from dymu.bench import tower as tower_bench
from dymu.bench.data import SAMPLE_DATA, load_data_file


def test_data_file_images_are_the_samples_first_images_in_order_cycling() -> None:
    samples = load_data_file(SAMPLE_DATA).samples
    images = tower_bench._data_images("sample", len(samples) + 2)
    assert len(images) == len(samples) + 2
    assert [im.tobytes() for im in images[-2:]] == [im.tobytes() for im in images[:2]]
    assert len({im.tobytes() for im in images[: len(samples)]}) == len(samples), "each sample's own image"


def test_tower_bench_runs_on_a_data_file() -> None:
    report = tower_bench.run(
        geometry="small", batch_sizes=(2,), target_tokens=24, calib_images=8, repeats=2, warmup=1,
        varied=True, data_file="sample",
    )  # fmt: skip
    assert report["images"] == "sample"
    (row,) = report["rows"]
    assert 1 <= row["tokens"]["min"] <= row["tokens"]["max"] <= 576
    assert {"stock", "dtome_no_merge", "dtome"} <= set(row["latency"])
    assert all(stats["n"] == 2 for stats in row["latency"].values())


def test_a_missing_data_file_is_a_one_line_error_before_any_work(tmp_path) -> None:
    missing = tmp_path / "nope.json"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "dymu.bench.tower", "--data-file", str(missing), "--geometry", "full"],
        capture_output=True, text=True, check=False, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "data file not found" in lines[0], done.stderr
    assert time.perf_counter() - started < 60, (
        "the data file must be checked before the full-size tower is built"
    )
