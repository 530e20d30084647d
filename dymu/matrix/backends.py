"""Where a matrix cell runs. The matrix loop (`orchestrate.py`) only knows this interface:
build the cell's environment, run the cell runner in it with a timeout, leave the runner's JSON
at reports/cells/<cell>.json and the combined output in a log. Everything else (freshness,
failure classes, the report) is the same whichever backend ran the cell.

Standard library only (the Docker SDK is imported where the Docker backend needs it).
The Docker backend's base image and GPUs are matrix options (`--docker-base`, `--docker-gpus`);
DYMU_EXTRA_CA_CERT (PEM text of extra CAs to trust in the image, for a TLS-inspecting proxy) is
the one environment variable, shared with compose.yaml.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .cells import requirements, runner_args


@dataclass
class CellRun:
    """How the backend's process ended (the runner's JSON says how the stages went)."""

    returncode: int | None
    timed_out: bool
    oom_killed: bool = False  # the kernel's (or the container's) evidence, not a guess from the log


class Backend(Protocol):
    name: str
    results: Path  # where the final <cell>.json lands; the runner writes <cell>.runner.json beside it

    def unavailable(self) -> str | None:
        """None when this backend can run cells here, else a one-line reason and fix."""

    def run_cell(self, name: str, cell: dict[str, Any], log_path: Path, timeout: float) -> CellRun:
        """Build the cell's environment, run `python -m dymu.matrix.runner` in it, log everything."""


def runner_file(results: Path, name: str) -> Path:
    """The runner's own (partial) result; only the matrix loop writes the final <cell>.json, so a
    runner that outlives its cell can never overwrite a recorded outcome."""
    return results / f"{name}.runner.json"


def oom_kills() -> int | None:
    """The kernel's OOM-kill count for this cgroup (cgroup v2 memory.events), None where unreadable."""
    try:
        for line in Path("/sys/fs/cgroup/memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def run_logged(command: list[str], log_path: Path, timeout: float, cwd: Path) -> CellRun:
    """Run `command` in its own process group with stdout+stderr into `log_path`. On a timeout or
    an interrupt the whole group is killed (no orphan keeps running, or writing)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    before = oom_kills()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return CellRun(None, True)
        except BaseException:  # Ctrl-C in the matrix loop: take the cell down with it
            _kill_group(proc)
            raise
    after = oom_kills()
    return CellRun(
        code,
        False,
        oom_killed=code in (-9, 137) and before is not None and after is not None and after > before,
    )


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group may already be gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class LocalBackend:
    """This machine: one uv venv per cell, built by the nox session `cell(<name>)` in its own
    process (a crash, hang or OOM there cannot take the matrix loop down)."""

    root: Path
    name: str = "local"

    @property
    def results(self) -> Path:
        return self.root / "reports" / "cells"

    def unavailable(self) -> str | None:
        if shutil.which("uv") is None:
            return "the local backend needs uv on PATH (python -m pip install uv)"
        return None

    def run_cell(self, name: str, cell: dict[str, Any], log_path: Path, timeout: float) -> CellRun:
        out = runner_file(self.results, name)
        return run_logged([sys.executable, "-m", "nox", "-s", f"cell({name})", "--", "--out", str(out)], log_path,
                          timeout, self.root)  # fmt: skip


def container_script(name: str, cell: dict[str, Any]) -> str:
    """What a Docker cell runs: copy the (read-only) source, build the venv with uv, run the runner."""
    reqs = " ".join(shlex.quote(r) for r in requirements(cell))
    legacy = " ".join(shlex.quote(r) for r in cell.get("legacy", []))
    lines = [
        "set -euo pipefail",
        "mkdir -p /tmp/work && cp -r /src/dymu /src/patches /src/tests /src/pyproject.toml /src/README.md /tmp/work/",
        f"uv venv -q /tmp/cell --python python{cell['python']}",
        "export VIRTUAL_ENV=/tmp/cell PATH=/tmp/cell/bin:$PATH",
        f"uv pip install -q {reqs}",
        "uv pip install -q -e '/tmp/work[test]'  # jsonschema: the bench stage validates its report",
        *([f"uv pip install -q --no-deps {legacy}"] if legacy else []),
        "python -m dymu.matrix.runner " + shlex.join(runner_args(name, cell, f"/out/{name}.runner.json", "docker")),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


@dataclass
class DockerBackend:
    """A container per cell, through the Docker SDK. The image is the cell's CUDA base image
    (envs/cells.toml `[images]`; `base` replaces it, e.g. with a local image where no registry can
    be reached) plus Python and uv (the `cell` target of docker/Dockerfile), built once per base and Python
    (DYMU_EXTRA_CA_CERT: PEM text of extra CAs to trust, for a TLS-inspecting proxy). The
    container installs the cell's pins with the host's uv cache mounted, runs the cell runner on
    a copy of the read-only source and writes reports/cells/<cell>.json. GPUs are passed through
    when the engine has the NVIDIA runtime (`gpus` = all|none overrides)."""

    root: Path
    base: str | None = None
    gpus_choice: str = "auto"
    name: str = "docker"

    @property
    def results(self) -> Path:
        return self.root / "reports" / "docker" / "cells"

    def _client(self):
        import docker  # noqa: PLC0415 - the Docker SDK: only this backend needs it

        return docker.from_env()

    def unavailable(self) -> str | None:
        try:
            import docker  # noqa: F401, PLC0415
        except ImportError:
            return "the docker backend needs the Docker SDK next to nox: python -m pip install docker"
        try:
            self._client().ping()
        except Exception as err:
            return f"no Docker engine reachable ({type(err).__name__}): start dockerd or set DOCKER_HOST"
        return None

    def base_image(self, cell: dict[str, Any]) -> str:
        return self.base or cell["image"]

    def image(self, cell: dict[str, Any], log) -> str:
        """dymu-cell:<base>-py<python>, built from docker/Dockerfile (target `cell`) when missing."""
        import docker  # noqa: PLC0415 - optional dependency

        base = self.base_image(cell)
        tag = "dymu-cell:" + re.sub(r"[^A-Za-z0-9_.-]+", "-", base)[:100] + f"-py{cell['python']}"
        client = self._client()
        try:
            client.images.get(tag)
            return tag
        except docker.errors.ImageNotFound:
            pass
        log.write(f"building {tag} from {base}\n")
        args = {"BASE_IMAGE": base, "PYTHON": cell["python"]}
        ca = os.environ.get("DYMU_EXTRA_CA_CERT")
        if ca:  # trust a TLS-inspecting proxy's CA inside the image (public certificates, not secrets)
            args["EXTRA_CA_CERT"] = ca
        try:
            _, output = client.images.build(path=str(self.root / "docker"), dockerfile="Dockerfile", target="cell",
                                            tag=tag, buildargs=args, network_mode="host", rm=True)  # fmt: skip
        except docker.errors.BuildError as err:
            log.writelines(chunk.get("stream", "") for chunk in err.build_log)
            raise
        log.writelines(chunk.get("stream", "") for chunk in output)
        return tag

    def gpus(self) -> bool:
        if self.gpus_choice != "auto":
            return self.gpus_choice == "all"
        return "nvidia" in (self._client().info().get("Runtimes") or {})

    def run_cell(self, name: str, cell: dict[str, Any], log_path: Path, timeout: float) -> CellRun:
        import docker  # noqa: PLC0415 - optional dependency

        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = self.results
        out.mkdir(parents=True, exist_ok=True)
        uv_cache = Path(os.environ.get("UV_CACHE_DIR", Path.home() / ".cache" / "uv"))
        uv_cache.mkdir(parents=True, exist_ok=True)
        with log_path.open("w") as log:
            try:
                image = self.image(cell, log)
            except (docker.errors.BuildError, docker.errors.APIError) as err:
                log.write(f"Failed to build the cell image: {err}\n")
                return CellRun(1, False)
            log.flush()
            env = {
                "HOME": "/tmp",
                "UV_CACHE_DIR": "/uv-cache",
                "UV_LINK_MODE": "copy",
                "UV_PYTHON_DOWNLOADS": "never",
            }
            volumes = {str(self.root): {"bind": "/src", "mode": "ro"}, str(out): {"bind": "/out", "mode": "rw"},
                       str(uv_cache): {"bind": "/uv-cache", "mode": "rw"}}  # fmt: skip
            devices = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])] if self.gpus() else []
            run = self.run_container(image, container_script(name, cell), log, timeout, environment=env,
                                     volumes=volumes, device_requests=devices, labels={"dymu.cell": name})  # fmt: skip
        return run

    def run_container(self, image: str, script: str, log, timeout: float, **options: Any) -> CellRun:
        """Run `script` under bash in a fresh container; its output goes to `log`. A timeout kills
        it; an OOM kill is written to the log in the words `classify` looks for; it is removed."""
        import requests  # noqa: PLC0415 - optional dependency

        container = self._client().containers.run(
            image, ["bash", "-c", script], detach=True, network_mode="host",
            user=f"{os.getuid()}:{os.getgid()}",
            init=True,  # an init as PID 1: the runner must not be PID 1, which ignores a SIGKILL it sends itself
            **options,
        )  # fmt: skip
        timed_out, code = False, None
        try:
            code = container.wait(timeout=timeout)["StatusCode"]
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            timed_out = True
            container.kill()
        log.write(container.logs().decode(errors="replace"))
        container.reload()
        oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
        if oom:
            log.write("\nOOMKilled: the container ran out of memory\n")
        container.remove(force=True)
        return CellRun(code, timed_out, oom_killed=oom)


BACKENDS = {"local": LocalBackend, "docker": DockerBackend}


def get_backend(name: str, root: Path, **options: Any) -> Backend:
    """The named backend (with its options, e.g. the Docker backend's `base`), or ValueError naming
    the ones that exist."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](root, **options)
