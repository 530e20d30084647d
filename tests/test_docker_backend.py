"""The Docker backend: what it runs in a container (always checked), and one real cell on a real
Docker engine (runs where an engine is reachable and DYMU_DOCKER_BASE names a base image that
exists there, since the CUDA images need a registry; skipped otherwise, e.g. in CI)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil

import pytest

from dymu.matrix import backends, cells, outcome

ROOT = pathlib.Path(__file__).resolve().parents[1]
CELLS = cells.load()


def test_container_script_installs_the_cells_pins_and_runs_the_runner() -> None:
    script = backends.container_script("reference", CELLS["cells"]["reference"])
    assert "uv pip install -q torch==2.1.2 transformers==4.37.2 sentencepiece protobuf 'numpy<2'" in script
    assert "uv pip install -q --no-deps llava-torch==1.2.2.post1" in script
    assert "--python python3.11" in script and script.startswith("set -euo pipefail")
    assert script.rstrip().endswith(
        "python -m dymu.matrix.runner --cell reference --out /out/reference.runner.json --backend docker"
    )
    broken = backends.container_script("seed-no-mask", CELLS["cells"]["seed-no-mask"])
    assert "--python python3.10" in broken and broken.rstrip().endswith("--disable-fixes causal-mask")
    assert "-e '/tmp/work[test]'" in script  # the runner finds the golden file next to the source copy


def test_docker_options_come_from_the_matrix_command_line(tmp_path) -> None:
    cell = CELLS["cells"]["latest"]
    assert backends.get_backend("docker", tmp_path).base_image(cell) == cell["image"]
    chosen = backends.get_backend("docker", tmp_path, base="debian-local:bookworm", gpus_choice="none")
    assert chosen.base_image(cell) == "debian-local:bookworm" and chosen.gpus() is False
    assert backends.get_backend("docker", tmp_path, gpus_choice="all").gpus() is True


def test_docker_backend_reports_why_it_cannot_run(monkeypatch, tmp_path) -> None:
    backend = backends.get_backend("docker", tmp_path)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    reason = backend.unavailable()
    assert reason and ("Docker SDK" in reason or "no Docker engine reachable" in reason)


def _engine_and_base() -> str | None:
    base = os.environ.get("DYMU_DOCKER_BASE")
    if not base:
        return None
    try:
        import docker
    except ImportError:
        return None
    try:
        docker.from_env().images.get(base)
    except docker.errors.DockerException:  # no engine reachable, or no such image there
        return None
    return base


NEEDS_ENGINE = pytest.mark.skipif(
    _engine_and_base() is None, reason="needs a Docker engine and DYMU_DOCKER_BASE (a local base)"
)


def _run(tmp_path, script: str, timeout: float, **options) -> tuple[backends.CellRun, str]:
    import docker

    log = tmp_path / "c.log"
    with log.open("w") as f:
        run = backends.DockerBackend(tmp_path).run_container(
            _engine_and_base(), script, f, timeout, labels={"dymu.test": tmp_path.name}, **options
        )
    left = docker.from_env().containers.list(all=True, filters={"label": f"dymu.test={tmp_path.name}"})
    assert not left, "the container must be removed"
    return run, log.read_text()


@NEEDS_ENGINE
def test_a_hung_container_is_killed_at_the_timeout(tmp_path) -> None:
    run, log = _run(tmp_path, "echo started; sleep 120", timeout=3)
    assert run.timed_out and run.returncode is None and "started" in log
    assert outcome.classify(run.returncode, log, run.timed_out)[0] == "timeout"


@NEEDS_ENGINE
def test_a_process_that_kills_itself_is_a_crash_not_ignored_as_pid_1(tmp_path) -> None:
    run, log = _run(tmp_path, "echo before; kill -9 $$; echo after", timeout=60)
    assert run.returncode == 137 and "after" not in log
    assert outcome.classify(run.returncode, log, run.timed_out) == ("crash", "killed (SIGKILL)")


@NEEDS_ENGINE
def test_an_out_of_memory_kill_is_classified_as_oom(tmp_path) -> None:
    run, log = _run(tmp_path, "head -c 400m /dev/zero | tail > /dev/null", timeout=120,
                    mem_limit="64m", memswap_limit="64m")  # fmt: skip
    assert "OOMKilled" in log, (run, log)
    assert outcome.classify(run.returncode, log, run.timed_out)[0] == "oom"


@NEEDS_ENGINE
def test_a_real_cell_runs_in_a_container(tmp_path) -> None:
    """The `latest` cell end to end in a container: image build, uv install, runner, JSON out."""
    root = tmp_path / "repo"  # a copy: the container mounts it, so host symlinks would dangle
    root.mkdir()
    for part in ("dymu", "patches", "tests", "docker", "pyproject.toml", "README.md"):
        src = ROOT / part
        if src.is_file():
            shutil.copy(src, root / part)
        else:
            shutil.copytree(src, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    backend = backends.DockerBackend(root, base=_engine_and_base())
    run = backend.run_cell("latest", CELLS["cells"]["latest"], tmp_path / "latest.log", timeout=1500)
    log = (tmp_path / "latest.log").read_text()
    assert (run.returncode, run.timed_out) == (0, False), log[-3000:]
    result = json.loads((root / "reports" / "docker" / "cells" / "latest.json").read_text())
    assert result["status"] == "pass" and result["versions"]["transformers"] == "5.24.0"
    assert result["stages"]["golden"]["status"] == "pass"


def test_compose_bench_runs_the_latest_cells_stack_on_the_gpus() -> None:
    """compose.yaml cannot read envs/cells.toml, so its pins are checked against it here."""
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    latest = CELLS["cells"]["latest"]
    args = services["bench"]["build"]["args"]
    assert (args["TORCH"], args["TRANSFORMERS"], args["PYTHON"]) == (latest["torch"], latest["transformers"],
                                                                     latest["python"])  # fmt: skip
    assert args["BASE_IMAGE"] == f"${{DYMU_DOCKER_BASE:-{latest['image']}}}"
    assert services["bench"]["build"]["target"] == "bench"
    assert services["bench"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["bench"]["command"][:3] == ["dymu", "bench", "--model-path"]
    assert services["bench-cpu"]["profiles"] == ["cpu"] and "deploy" not in services["bench-cpu"]


def test_workflow_fans_cells_out_to_gpu_runners_and_joins_them_in_a_report() -> None:
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "gpu-matrix.yml").read_text())
    jobs = workflow["jobs"]
    assert set(jobs) == {"plan", "cell", "report", "bench"} and workflow["permissions"] == {
        "contents": "read"
    }
    cell = jobs["cell"]
    assert cell["runs-on"] == ["self-hosted", "linux", "x64", "gpu"] and cell["needs"] == "plan"
    assert (
        cell["strategy"]["fail-fast"] is False
        and "needs.plan.outputs.cells" in cell["strategy"]["matrix"]["cell"]
    )
    assert any('--cells "$CELL" --backend docker' in step.get("run", "") for step in cell["steps"])
    assert jobs["report"]["needs"] == "cell" and jobs["report"]["if"] == "always()"
    plan = next(step["run"] for step in jobs["plan"]["steps"] if step.get("id") == "plan")
    assert 'python3 -m dymu.matrix.orchestrate --set "$CELL_SET" --list --json' in plan
    every_use = [step["uses"] for job in jobs.values() for step in job["steps"] if "uses" in step]
    assert all(__import__("re").fullmatch(r"actions/[\w-]+@[0-9a-f]{40}", use) for use in every_use), (
        every_use
    )


def test_the_plan_job_lists_exactly_what_the_matrix_selects() -> None:
    import subprocess
    import sys

    def run(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "dymu.matrix.orchestrate", *args], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout  # fmt: skip

    planned = json.loads(run("--set", "core,broken", "--list", "--json"))
    assert planned == run("--set", "core", "--list").split() + run("--set", "broken", "--list").split()
    assert planned == CELLS["sets"]["core"] + CELLS["sets"]["broken"]


def test_dockerfile_defaults_are_the_latest_cells_stack() -> None:
    """The Dockerfile's ARG defaults (used when built without compose) must not drift from cells.toml."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    latest = CELLS["cells"]["latest"]
    assert defaults["BASE_IMAGE"] == latest["image"]
    assert (defaults["TORCH"], defaults["TRANSFORMERS"], defaults["PYTHON"]) == (
        latest["torch"], latest["transformers"], latest["python"])  # fmt: skip


def test_gpu_cell_script_takes_its_versions_from_cells_toml() -> None:
    import subprocess
    import sys

    script = (ROOT / "ci" / "gpu_cells.sh").read_text()
    assert "python3 -m dymu.matrix.cells gpu" in script and not re.search(r"\b[45]\.\d+\.\d+\b", script)
    listed = subprocess.run([sys.executable, "-m", "dymu.matrix.cells", "gpu"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()  # fmt: skip
    assert listed == CELLS["gpu"]["transformers"]
