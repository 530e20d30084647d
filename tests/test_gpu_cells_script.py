"""ci/gpu_cells.sh schedules cells one GPU each, as many at once as there are GPUs: run with stand-in
`python3` and `nvidia-smi` commands (the real ones need the GPU machine) that record which GPU each
runner saw and when."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dymu.matrix.runner import gpu_identity

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = {"t4372": "4.37.2", "t4573": "4.57.3", "t500": "5.0.0", "t5240": "5.24.0"}

FAKE_PYTHON = r"""#!/usr/bin/env bash
# stand-in python3: pip installs nothing, transformers reports the set's version, the runner logs
# its GPU and sleeps
case "$*" in
  *"-m pip install"*) exit 0 ;;
  *"import transformers"*)
    set_name=$(echo "$PYTHONPATH" | sed -E 's#.*/site-([a-z0-9]+)-.*#\1#')
    grep "^$set_name " "$FAKE_DIR/versions" | cut -d' ' -f2 ;;
  *"-m dymu.matrix.runner"*)
    echo "start $CUDA_VISIBLE_DEVICES $(date +%s.%N)" >> "$FAKE_DIR/events"
    sleep 1
    echo "end $CUDA_VISIBLE_DEVICES $(date +%s.%N)" >> "$FAKE_DIR/events"
    echo "cell done" ;;
  *) echo "unexpected python3 call: $*" >&2; exit 3 ;;
esac
"""


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run(
    tmp_path: Path, gpus: int, jobs: str | None = None
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    fake, out, work = tmp_path / "bin", tmp_path / "out", tmp_path / "work"
    for folder in (fake, out, work / ".whl"):
        folder.mkdir(parents=True, exist_ok=True)
    (work / ".whl" / "llava_torch-0.whl").write_text("")
    (work / "ci").mkdir(exist_ok=True)
    (work / "ci" / "gpu_cells.sh").write_text((ROOT / "ci" / "gpu_cells.sh").read_text())
    (fake / "versions").write_text("".join(f"{k} {v}\n" for k, v in VERSIONS.items()))
    _script(fake / "python3", FAKE_PYTHON)
    _script(
        fake / "nvidia-smi",
        "#!/usr/bin/env bash\n" + "".join(f"echo 'GPU {i}: NVIDIA H200'\n" for i in range(gpus)),
    )
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "OUT": str(out), "FAKE_DIR": str(fake)}
    env.pop("GPU_CELL_JOBS", None)
    if jobs is not None:
        env["GPU_CELL_JOBS"] = jobs
    done = subprocess.run(["bash", "ci/gpu_cells.sh", *VERSIONS], cwd=work, env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    events = fake / "events"
    return done, [line.split() for line in events.read_text().splitlines()] if events.exists() else []


def _most_at_once(events: list[list[str]]) -> int:
    running = most = 0
    for kind, _, _ in sorted(events, key=lambda e: (float(e[2]), e[0] == "start")):
        running += 1 if kind == "start" else -1
        most = max(most, running)
    return most


def test_two_gpus_run_two_cells_at_a_time_each_on_its_own_gpu(tmp_path) -> None:
    start = time.monotonic()
    done, events = _run(tmp_path, gpus=2)
    wall = time.monotonic() - start
    assert done.returncode == 0, done.stdout + done.stderr
    starts = [e for e in events if e[0] == "start"]
    assert len(starts) == 4 and {e[1] for e in starts} == {"0", "1"}
    assert _most_at_once(events) == 2
    for gpu in ("0", "1"):  # never two cells on one GPU at once
        mine = [e for e in events if e[1] == gpu]
        assert _most_at_once(mine) == 1
    assert wall < 3.9  # four 1 s cells, two at a time (one at a time takes over 4 s)
    assert done.stdout.count("== gpu cell: transformers") == 4


def test_one_gpu_or_gpu_cell_jobs_1_runs_cells_one_after_another(tmp_path) -> None:
    done, events = _run(tmp_path, gpus=4, jobs="1")
    assert done.returncode == 0 and _most_at_once(events) == 1 and {e[1] for e in events} == {"0"}


@pytest.mark.parametrize("jobs", ["abc", "0", "-1"])
def test_a_bad_gpu_cell_jobs_is_refused(tmp_path, jobs: str) -> None:
    done, events = _run(tmp_path, gpus=2, jobs=jobs)
    assert done.returncode == 2 and "GPU_CELL_JOBS" in done.stdout and events == []


def test_a_gpu_cell_records_which_gpu_it_ran_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cells side by side must each say which card they had: two cells with one UUID shared a GPU."""
    props = SimpleNamespace(name="NVIDIA H200", uuid="GPU-1234")
    fake = SimpleNamespace(
        cuda=SimpleNamespace(get_device_properties=lambda i: props, device_count=lambda: 1)
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gpu_identity(fake) == {
        "cuda_visible_devices": "1",
        "name": "NVIDIA H200",
        "uuid": "GPU-1234",
        "count": 1,
    }
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_identity(fake)["cuda_visible_devices"] is None
