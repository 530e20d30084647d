"""Where a matrix cell runs. The matrix loop (`orchestrate.py`) only knows this interface:
build the cell's environment, run the cell runner in it with a timeout, leave the runner's JSON
at reports/cells/<cell>.json and the combined output in a log. Everything else (freshness,
failure classes, the report) is the same whichever backend ran the cell.

Every running cell is registered in `LIVE`, so an interrupt of the matrix loop (Ctrl-C, SIGTERM)
can kill them all from the main thread, whichever worker thread waits on them.

Standard library only (the Docker SDK is imported where the Docker backend needs it, through
`docker_sdk()`). The Docker backend's base image and GPUs are matrix options (`--docker-base`,
`--docker-gpus`); its environment variables (DYMU_CA_CERT_FILE, DYMU_UID, DYMU_GID) are checked by
docker_env.py; the GPU mechanism and the driver floor come from gpu_host.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import DymuError
from . import docker_env, gpu_host
from .cells import image_ref, requirements, runner_args


@dataclass
class CellRun:
    """How the backend's process ended (the runner's JSON says how the stages went)."""

    returncode: int | None
    timed_out: bool
    oom_killed: bool = False  # the kernel's (or the container's) evidence, not a guess from the log
    interrupted: bool = False  # killed because the matrix run was interrupted, not by its own doing
    refused: tuple[str, str] | None = None  # (class, signature): the backend would not start this cell


class LiveCells:
    """The cells running now, each with a function that kills it. Worker threads wait on their
    cells; a signal reaches only the main thread, which calls `stop()` to kill every one of them
    (a cell registered after `stop()` is killed at once, so none slips through)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kills: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()
        self._stopping = False

    @property
    def stopping(self) -> bool:
        return self._stopping

    def reset(self) -> None:
        """A new matrix run (tests run several in one process)."""
        with self._lock:
            self._kills.clear()
            self._stopping = False

    def add(self, kill: Callable[[], None]) -> int:
        with self._lock:
            key = next(self._ids)
            self._kills[key] = kill
            stopping = self._stopping
        if stopping:
            kill()
        return key

    def discard(self, key: int) -> None:
        with self._lock:
            self._kills.pop(key, None)

    def stop(self) -> None:
        """Kill every running cell; later ones are killed as they register."""
        with self._lock:
            self._stopping = True
            kills = list(self._kills.values())
        for kill in kills:
            with contextlib.suppress(Exception):  # one cell that is already gone must not spare the rest
                kill()


LIVE = LiveCells()


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


def run_logged(command: list[str], log_path: Path, timeout: float, cwd: Path,
               env: dict[str, str] | None = None) -> CellRun:  # fmt: skip
    """Run `command` in its own process group with stdout+stderr into `log_path` (`env`: extra
    environment variables). On a timeout or an interrupt the whole group is killed (no orphan
    keeps running, or writing)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if LIVE.stopping:  # the run was interrupted before this cell started
        return CellRun(None, False, interrupted=True)
    before = oom_kills()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
            env={**os.environ, **env} if env else None,
        )  # fmt: skip
        key = LIVE.add(lambda: _signal_group(proc))
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return CellRun(None, True)
        except BaseException:  # Ctrl-C where the loop waits in this thread: take the cell down with it
            _kill_group(proc)
            raise
        finally:
            LIVE.discard(key)
    _signal_group(proc)  # whatever of the cell's group outlived its leader goes with it
    if LIVE.stopping:
        return CellRun(code, False, interrupted=True)
    after = oom_kills()
    return CellRun(
        code,
        False,
        oom_killed=code in (-9, 137) and before is not None and after is not None and after > before,
    )


def _signal_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group may already be gone
        os.killpg(proc.pid, signal.SIGKILL)


def _kill_group(proc: subprocess.Popen) -> None:
    _signal_group(proc)
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

    def cannot_run(self, cell: dict[str, Any]) -> str | None:
        """Why this machine cannot build the cell at all (reported as skipped, not as a failure)."""
        python = f"python{cell['python']}"
        if shutil.which(python) is None:
            return f"no {python} on this machine's PATH (the cell's Python); the Docker backend installs it"
        return None

    def run_cell(self, name: str, cell: dict[str, Any], log_path: Path, timeout: float) -> CellRun:
        out = runner_file(self.results, name)
        gpu = ["--expect-gpu"] if cell.get("expect_gpu") else []
        # --gpus-per-cell: this cell's own GPUs (the matrix hands them out), else whatever it inherits
        env = {"CUDA_VISIBLE_DEVICES": ",".join(cell["gpu_ids"])} if cell.get("gpu_ids") else None
        return run_logged([sys.executable, "-m", "nox", "-s", f"cell({name})", "--", "--out", str(out), *gpu],
                          log_path, timeout, self.root, env)  # fmt: skip


def only_gpus(request: dict[str, Any], ids: list[str] | None) -> dict[str, Any]:
    """A DeviceRequest's keywords narrowed from every GPU to `ids` (--gpus-per-cell): device ids for
    the nvidia driver, `nvidia.com/gpu=<id>` names for CDI; unchanged without ids."""
    if not ids:
        return request
    if request.get("driver") == "cdi":
        return {**request, "device_ids": [f"nvidia.com/gpu={i}" for i in ids]}
    narrowed = {k: v for k, v in request.items() if k != "count"}
    return {**narrowed, "device_ids": list(ids)}


def docker_sdk() -> Any:
    """The Docker SDK module. ImportError when it is missing, and also when `import docker` finds a
    folder named docker/ instead (this repository has one: run from its root without the SDK
    installed, Python imports that folder as an empty namespace package, with no `from_env`)."""
    import docker  # noqa: PLC0415 - the Docker SDK: only the Docker backend needs it

    if not callable(getattr(docker, "from_env", None)):
        where = ", ".join(getattr(docker, "__path__", [])) or str(getattr(docker, "__file__", "?"))
        raise ImportError(f"`import docker` found {where}, not the Docker SDK")
    return docker


def quiet_sdk_logs() -> None:
    """The SDK and urllib3 log every request at DEBUG (whole build URLs); nox's root logger prints
    DEBUG, so without this the matrix output is the engine's traffic. Warnings still show."""
    for name in ("docker", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


# What the runner needs from the checkout (the library, the patch data, the golden outputs and the
# packaging files); each is mounted read-only on its own, so .git (its config, remotes, hooks),
# reports/ and anything else in the checkout stay out of the container.
SOURCES = ("dymu", "patches", "tests/golden", "pyproject.toml", "README.md")
CACHE_IN_CONTAINER = "/uv-cache"


def container_script(name: str, cell: dict[str, Any]) -> str:
    """What a Docker cell runs: copy the (read-only) sources, build the venv with uv, run the runner."""
    reqs = " ".join(shlex.quote(r) for r in requirements(cell))
    legacy = " ".join(shlex.quote(r) for r in cell.get("legacy", []))
    lines = [
        "set -euo pipefail",
        "mkdir -p /tmp/work/tests && cp -r /src/dymu /src/patches /src/pyproject.toml /src/README.md /tmp/work/ "
        "&& cp -r /src/tests/golden /tmp/work/tests/",
        f"uv venv -q /tmp/cell --python python{cell['python']}",
        "export VIRTUAL_ENV=/tmp/cell PATH=/tmp/cell/bin:$PATH",
        f"uv pip install -q {reqs}",
        "uv pip install -q -e '/tmp/work[test]'  # jsonschema: the bench stage validates its report",
        *([f"uv pip install -q --no-deps {legacy}"] if legacy else []),
        "python -m dymu.matrix.runner " + shlex.join(runner_args(name, cell, f"/out/{name}.runner.json", "docker")),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


BUILD_FILES = ("docker/Dockerfile", "docker/setup.sh")  # what the `cell` target reads from its context


def ca_digest(ca_file: str | None) -> str:
    """A short digest of the CA file's content ("" for none): part of the image tag, so an image
    built with another CA (or none) is never reused."""
    return hashlib.sha256(Path(ca_file).read_bytes()).hexdigest()[:12] if ca_file else ""


def build_context(root: Path, into: Path, ca_file: str | None) -> None:
    """The `cell` image's build context in `into`, laid out like the repository (compose builds the
    same Dockerfile from the repository itself): the Dockerfile, setup.sh and docker/ca/extra-ca.pem,
    a copy of the CA file (empty without one)."""
    for part in BUILD_FILES:
        (into / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / part, into / part)
    (into / "docker" / "ca").mkdir()
    (into / "docker" / "ca" / "extra-ca.pem").write_bytes(Path(ca_file).read_bytes() if ca_file else b"")


def container_user(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """The uid:gid containers run as: DYMU_UID/DYMU_GID, else the invoking user's, and never root
    (a root caller's containers run as the image's `dymu` user, 1000:1000)."""
    env = docker_env.check(os.environ if environ is None else environ)
    uid = int(env.get("DYMU_UID", os.getuid()))
    gid = int(env.get("DYMU_GID", os.getgid()))
    return (uid, gid) if uid != 0 else (docker_env.IMAGE_UID, docker_env.IMAGE_GID)


def _hand_over(path: Path, uid: int, gid: int) -> None:
    """A directory the container user writes to: ours already, or (when we are root) chowned to it."""
    if os.getuid() == 0 and (uid, gid) != (0, 0):
        os.chown(path, uid, gid)


def _remove_run_dir(path: Path) -> None:
    # overlayfs leaves its work/work directory owned by root with mode 000: empty, so rmdir takes it
    with contextlib.suppress(OSError):
        (path / "cache-work" / "work").rmdir()
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class DockerBackend:
    """A container per cell, through the Docker SDK. The image is the cell's CUDA base image
    (envs/cells.toml `[images]`, `tag@digest` where the digest is recorded; `base` replaces it, e.g.
    with a local image where no registry can be reached) plus Python and uv (the `cell` target of
    docker/Dockerfile), built once per base, Python and CA (DYMU_CA_CERT_FILE: a PEM file of extra
    CAs to trust, for a TLS-inspecting proxy). GPUs are passed through by whatever the engine has:
    the nvidia runtime, the NVIDIA hook or CDI (gpu_host.gpu_request; `gpus` = all|none overrides);
    a cell that expects a GPU is not started without one (`gpu-missing`), nor a CUDA base on an older
    driver than it needs (`driver-too-old`).

    What a container gets, and why:
    - sources: only SOURCES, each bind-mounted read-only (no .git/config, no other cells' results);
    - output: a fresh per-cell directory (its only writable mount); the backend moves the runner's
      partial file from there to reports/docker/cells/ when the container is gone;
    - network: Docker's default bridge, not the host's network: the container reaches PyPI through
      the engine's NAT but not services listening on the host (a proxy on the host's loopback
      must then listen on an address the bridge reaches, given as HTTPS_PROXY in the image);
    - uv cache: the host's cache is the read-only lower layer of an overlay volume whose upper
      layer is a per-run directory that is thrown away after the cell, so a container reuses
      every cached wheel but nothing it writes (a poisoned wheel, a tampered archive) reaches the
      host's cache or a later run. uv's own verification would need hash-pinned requirements,
      which the cells do not have. Where the engine cannot mount the overlay, or the container
      user could not write into the host's cache directories (a root-owned cache and a non-root
      container), the cell gets an empty private cache instead (slower: every wheel downloads);
    - user: non-root (container_user), no capabilities, no privilege gain through setuid files;
    - an init as PID 1, so the runner is never PID 1 (which ignores a SIGKILL it sends itself)."""

    root: Path
    base: str | None = None
    gpus_choice: str = "auto"
    name: str = "docker"

    def __post_init__(self) -> None:
        if self.base is not None:
            docker_env.check_image_ref("--docker-base", self.base)

    @property
    def results(self) -> Path:
        return self.root / "reports" / "docker" / "cells"

    def _client(self):
        quiet_sdk_logs()
        return docker_sdk().from_env()

    def unavailable(self) -> str | None:
        try:
            docker_sdk()
        except ImportError as err:
            return (
                f"the docker backend needs the Docker SDK next to nox ({err}): python -m pip install docker"
            )
        try:
            self._client().ping()
        except Exception as err:
            return f"no Docker engine reachable ({type(err).__name__}): start dockerd or set DOCKER_HOST"
        return None

    def base_image(self, cell: dict[str, Any]) -> str:
        return self.base or image_ref(cell)

    def image(self, cell: dict[str, Any], log) -> str:
        """dymu-cell:<base>-py<python>[-ca<digest>], built from docker/Dockerfile (target `cell`) when
        missing. DYMU_CA_CERT_FILE (a PEM file: one proxy CA or a whole system bundle) goes into the
        build context as a file, never a build argument (one env variable, capped at 128 KiB)."""
        docker = docker_sdk()
        base = self.base_image(cell)
        ca_file = docker_env.check(os.environ).get("DYMU_CA_CERT_FILE")
        client = self._client()
        ca = ca_digest(ca_file)
        tag = ("dymu-cell:" + re.sub(r"[^A-Za-z0-9_.-]+", "-", base)[:90] + f"-py{cell['python']}"
               + (f"-ca{ca}" if ca else ""))  # fmt: skip
        try:
            client.images.get(tag)
            return tag
        except docker.errors.ImageNotFound:
            pass
        with tempfile.TemporaryDirectory(prefix="dymu-build-") as context:
            build_context(self.root, Path(context), ca_file)
            log.write(
                f"building {tag} from {base}" + (f" (trusting the CAs in {ca_file})" if ca else "") + "\n"
            )
            try:  # the build's network is the engine's default (bridge), as for the containers; forcerm:
                # a failed step's container is removed too (rm alone keeps it, stopped, for debugging)
                _, output = client.images.build(path=context, dockerfile="docker/Dockerfile", target="cell",
                                                tag=tag, buildargs={"BASE_IMAGE": base, "PYTHON": cell["python"]},
                                                rm=True, forcerm=True, labels={"dymu.ca": ca or "none"})  # fmt: skip
            except docker.errors.BuildError as err:
                log.writelines(chunk.get("stream", "") for chunk in err.build_log)
                raise
        log.writelines(chunk.get("stream", "") for chunk in output)
        return tag

    def gpu_request(self) -> tuple[str, dict[str, Any]] | None:
        """(mechanism, DeviceRequest keywords) that give a container every GPU, None for none: the
        engine's own mechanism (gpu_host.gpu_request) on `auto`; `all` uses it too, else asks for
        the nvidia driver (the engine then says why it cannot); `none` passes none."""
        if self.gpus_choice == "none":
            return None
        found = gpu_host.gpu_request(self._client().info())
        if found or self.gpus_choice == "auto":
            return found
        return "--docker-gpus all", {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}

    def gpu_refusal(
        self, cell: dict[str, Any], request: tuple[str, dict[str, Any]] | None, log
    ) -> tuple[str, str] | None:
        """(class, signature) when the cell must not start: it expects a GPU the engine cannot pass
        (`gpu-missing`), or the host's driver is older than its CUDA base needs (`driver-too-old`,
        which the NVIDIA runtime would only say after the build and the downloads)."""
        if request is None:
            log.write("GPUs: none (" + ("--docker-gpus none" if self.gpus_choice == "none" else
                      "the engine has no nvidia runtime, no NVIDIA hook and no nvidia.com/gpu CDI device") + ")\n")  # fmt: skip
            if cell.get("expect_gpu") and self.gpus_choice == "auto":
                return "gpu-missing", ("the cell expects a GPU and the engine offers none (no nvidia runtime, "
                                       "NVIDIA hook or nvidia.com/gpu CDI spec); install the NVIDIA Container "
                                       "Toolkit or run without --expect-gpu")  # fmt: skip
            return None
        log.write(f"GPUs: all, through {request[0]}\n")
        base = self.base_image(cell)
        driver = gpu_host.host_driver()
        if driver is None and gpu_host.cuda_of_image(base):
            log.write(
                "NVIDIA driver version unknown on this host (no nvidia-smi): not checked against the base\n"
            )
        try:
            problem = gpu_host.driver_problem(base, driver)
        except DymuError as err:  # a CUDA release the table does not know yet
            log.write(f"NVIDIA driver not checked: {err}\n")
            return None
        return ("driver-too-old", problem) if problem else None

    def host_cache(self) -> Path:
        """The host's uv cache (shared with the local backend); containers never write to it."""
        return Path(os.environ.get("UV_CACHE_DIR", Path.home() / ".cache" / "uv"))

    def mounts(self, run_dir: Path, uid: int, gid: int, log) -> dict[str, dict[str, str]]:
        """The container's volumes: read-only sources, the per-cell output directory, the uv cache."""
        volumes = {str(self.root / part): {"bind": f"/src/{part}", "mode": "ro"} for part in SOURCES}
        out = run_dir / "out"
        out.mkdir()
        _hand_over(out, uid, gid)
        volumes[str(out)] = {"bind": "/out", "mode": "rw"}
        volumes.update(self.cache_mount(run_dir, uid, gid, log))
        return volumes

    def cache_mount(self, run_dir: Path, uid: int, gid: int, log) -> dict[str, dict[str, str]]:
        """The host cache as the lower layer of a per-run overlay volume, or an empty private cache."""
        cache = self.host_cache()
        cache.mkdir(parents=True, exist_ok=True)
        if cache.stat().st_uid == uid:
            upper, work = run_dir / "cache-upper", run_dir / "cache-work"
            upper.mkdir()
            work.mkdir()
            _hand_over(upper, uid, gid)
            try:
                volume = self._client().volumes.create(
                    name=f"dymu-uv-{run_dir.name}", driver="local", labels={"dymu.run": run_dir.name},
                    driver_opts={"type": "overlay", "device": "overlay",
                                 "o": f"lowerdir={cache},upperdir={upper},workdir={work}"},
                )  # fmt: skip
                return {volume.name: {"bind": CACHE_IN_CONTAINER, "mode": "rw"}}
            except Exception as err:  # an engine without overlay support: a private cache below
                log.write(f"no overlay on the uv cache ({err}): this cell gets an empty private cache\n")
        else:
            log.write(f"the uv cache {cache} is not owned by the container user {uid}: "
                      "this cell gets an empty private cache\n")  # fmt: skip
        private = run_dir / "cache-private"
        private.mkdir()
        _hand_over(private, uid, gid)
        return {str(private): {"bind": CACHE_IN_CONTAINER, "mode": "rw"}}

    def run_cell(self, name: str, cell: dict[str, Any], log_path: Path, timeout: float) -> CellRun:
        docker = docker_sdk()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.results.mkdir(parents=True, exist_ok=True)
        uid, gid = container_user()
        run_dir = Path(tempfile.mkdtemp(prefix=f"dymu-{name}-"))
        try:
            with log_path.open("w") as log:
                request = self.gpu_request()
                refusal = self.gpu_refusal(cell, request, log)
                if refusal:
                    log.write(f"not started: {refusal[0]}: {refusal[1]}\n")
                    return CellRun(None, False, refused=refusal)
                try:
                    image = self.image(cell, log)
                except (docker.errors.BuildError, docker.errors.APIError) as err:
                    log.write(f"Failed to build the cell image: {err}\n")
                    return CellRun(1, False)
                log.flush()
                env = {"HOME": "/tmp", "UV_CACHE_DIR": CACHE_IN_CONTAINER, "UV_LINK_MODE": "copy",
                       "UV_PYTHON_DOWNLOADS": "never"}  # fmt: skip
                devices = (
                    [docker.types.DeviceRequest(**only_gpus(request[1], cell.get("gpu_ids")))]
                    if request
                    else []
                )
                volumes = self.mounts(run_dir, uid, gid, log)
                run = self.run_container(image, container_script(name, cell), log, timeout, environment=env,
                                         volumes=volumes, device_requests=devices, labels={"dymu.cell": name},
                                         user=f"{uid}:{gid}")  # fmt: skip
            partial = run_dir / "out" / f"{name}.runner.json"
            if partial.is_file():  # copy2 keeps its time: the matrix checks it was written during this run
                shutil.copy2(partial, runner_file(self.results, name))
            return run
        finally:
            self._remove_volumes(run_dir.name)
            _remove_run_dir(run_dir)

    def _remove_volumes(self, run: str) -> None:
        with contextlib.suppress(Exception):  # the volume may not exist (private cache)
            for volume in self._client().volumes.list(filters={"label": f"dymu.run={run}"}):
                volume.remove(force=True)

    def run_container(self, image: str, script: str, log, timeout: float, **options: Any) -> CellRun:
        """Run `script` under bash in a fresh container; its output goes to `log`. A timeout or an
        interrupt of the matrix kills it; an OOM kill is written to the log; it is removed."""
        import requests  # noqa: PLC0415 - optional dependency (the Docker SDK's)

        if LIVE.stopping:
            return CellRun(None, False, interrupted=True)
        options.setdefault("user", "{}:{}".format(*container_user()))
        container = self._client().containers.run(
            image, ["bash", "-c", script], detach=True,
            network_mode="bridge",  # Docker's default network, never the host's (see the class doc)
            cap_drop=["ALL"], security_opt=["no-new-privileges:true"],
            init=True,  # an init as PID 1: the runner must not be PID 1, which ignores a SIGKILL it sends itself
            **options,
        )  # fmt: skip
        key = LIVE.add(container.kill)
        timed_out, code = False, None
        try:
            code = container.wait(timeout=timeout)["StatusCode"]
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            timed_out = True
            container.kill()
        finally:
            LIVE.discard(key)
        log.write(container.logs().decode(errors="replace"))
        container.reload()
        oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
        if oom:
            log.write("\nOOMKilled: the container ran out of memory\n")
        container.remove(force=True)
        return CellRun(code, timed_out, oom_killed=oom, interrupted=LIVE.stopping and not timed_out)


BACKENDS = {"local": LocalBackend, "docker": DockerBackend}


def get_backend(name: str, root: Path, **options: Any) -> Backend:
    """The named backend (with its options, e.g. the Docker backend's `base`), or ValueError naming
    the ones that exist."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](root, **options)
