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
    assert outcome.classify(run.returncode, log, run.timed_out) == ("crash", "killed by signal 9")


@NEEDS_ENGINE
def test_an_out_of_memory_kill_is_classified_as_oom(tmp_path) -> None:
    run, log = _run(tmp_path, "head -c 400m /dev/zero | tail > /dev/null", timeout=120,
                    mem_limit="64m", memswap_limit="64m")  # fmt: skip
    assert run.oom_killed and "OOMKilled" in log, (run, log)
    assert outcome.classify(run.returncode, log, run.timed_out, run.oom_killed)[0] == "oom"


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


class _FakeDocker:
    """Enough of the Docker SDK (module and client) to see what the backend asks the engine for."""

    class errors:  # the SDK's names
        class ImageNotFound(Exception):
            pass

        class BuildError(Exception):
            pass

        class APIError(Exception):
            pass

    class types:
        class DeviceRequest:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

    def __init__(self, overlay_fails: bool = False, on_wait=None) -> None:
        self.runs: list[dict] = []
        self.volumes_made: list[dict] = []
        self.removed_volumes: list[str] = []
        self.killed = 0
        self.overlay_fails = overlay_fails
        self.on_wait = on_wait or (lambda container: None)
        fake = self

        class Volume:
            def __init__(self, name):
                self.name = name

            def remove(self, force=False):
                fake.removed_volumes.append(self.name)

        class Volumes:
            def create(self, **kwargs):
                if fake.overlay_fails:
                    raise fake.errors.APIError("overlay: invalid argument")
                fake.volumes_made.append(kwargs)
                return Volume(kwargs["name"])

            def list(self, filters):
                run = filters["label"].split("=", 1)[1]
                return [Volume(v["name"]) for v in fake.volumes_made if v["labels"]["dymu.run"] == run]

        class Images:
            def get(self, tag):
                return tag

        class Container:
            def __init__(self, kwargs):
                self.kwargs = kwargs
                self.attrs = {"State": {"OOMKilled": False}}

            def wait(self, timeout):
                fake.on_wait(self)
                out = next(host for host, m in self.kwargs["volumes"].items() if m["bind"] == "/out")
                name = self.kwargs["labels"]["dymu.cell"]
                pathlib.Path(out, f"{name}.runner.json").write_text(
                    json.dumps({"cell": name, "status": "pass"})
                )
                return {"StatusCode": 0}

            def kill(self):
                fake.killed += 1

            def logs(self):
                return b"runner output\n"

            def reload(self):
                pass

            def remove(self, force=False):
                pass

        class Containers:
            def run(self, image, command, **kwargs):
                fake.runs.append({"image": image, "command": command, **kwargs})
                return Container(kwargs)

        self.client = type("Client", (), {"volumes": Volumes(), "images": Images(), "containers": Containers(),
                                          "info": lambda s: {"Runtimes": {}}, "ping": lambda s: True})()  # fmt: skip

    def from_env(self):
        return self.client


@pytest.fixture
def fake_docker(monkeypatch, tmp_path):
    """A fake `docker` and `requests` for the backend's function-level imports; a uv cache in tmp
    owned by the container user (as the invoking user's own cache is)."""
    import sys
    import types

    for name in [n for n in os.environ if n.startswith("DYMU_")]:
        monkeypatch.delenv(name)
    fake = _FakeDocker()
    monkeypatch.setitem(sys.modules, "docker", fake)
    exceptions = types.SimpleNamespace(ReadTimeout=TimeoutError, ConnectionError=ConnectionError)
    monkeypatch.setitem(sys.modules, "requests", types.SimpleNamespace(exceptions=exceptions))
    cache = tmp_path / "uv-cache"
    cache.mkdir()
    monkeypatch.setenv("UV_CACHE_DIR", str(cache))
    uid, gid = backends.container_user()
    if os.getuid() == 0:
        os.chown(cache, uid, gid)
    monkeypatch.setattr(backends.tempfile, "tempdir", str(tmp_path / "runs"))
    (tmp_path / "runs").mkdir()
    return fake


def _repo(tmp_path) -> pathlib.Path:
    root = tmp_path / "repo"
    for part in backends.SOURCES:
        (root / part).parent.mkdir(parents=True, exist_ok=True)
        (root / part).mkdir() if "." not in part else (root / part).write_text("x")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[remote]\n")
    return root


def test_a_docker_cell_mounts_only_its_sources_read_only_on_the_bridge_as_non_root(
    tmp_path, fake_docker
) -> None:
    root = _repo(tmp_path)
    backend = backends.DockerBackend(root, gpus_choice="none")
    run = backend.run_cell("latest", CELLS["cells"]["latest"], tmp_path / "latest.log", timeout=60)
    assert (run.returncode, run.timed_out, run.interrupted) == (0, False, False)
    [call] = fake_docker.runs
    assert call["network_mode"] == "bridge" and call["cap_drop"] == ["ALL"]
    assert call["security_opt"] == ["no-new-privileges:true"] and call["init"] is True
    uid, gid = (int(x) for x in call["user"].split(":"))
    assert uid != 0 and gid != 0 and (uid == os.getuid() or os.getuid() == 0)
    volumes = call["volumes"]
    sources = {host: m for host, m in volumes.items() if m["bind"].startswith("/src/")}
    assert {pathlib.Path(h) for h in sources} == {root / part for part in backends.SOURCES}
    assert all(m["mode"] == "ro" and m["bind"] == f"/src/{pathlib.Path(h).relative_to(root)}"
               for h, m in sources.items())  # fmt: skip
    writable = {m["bind"] for m in volumes.values() if m["mode"] != "ro"}
    assert writable == {"/out", "/uv-cache"}
    out = next(h for h, m in volumes.items() if m["bind"] == "/out")
    assert not pathlib.Path(out).is_relative_to(root), "the output is a fresh directory, not the checkout"
    for host in volumes:  # nothing else of the checkout: no root, no .git, no reports
        assert host not in (str(root), str(root / ".git")) and not host.startswith(str(root / "reports"))
    # the uv cache: an overlay whose read-only lower layer is the host cache; writes go to a per-run layer
    [made] = fake_docker.volumes_made
    cache = os.environ["UV_CACHE_DIR"]
    assert volumes[made["name"]] == {"bind": "/uv-cache", "mode": "rw"} and cache not in volumes
    opts = dict(kv.split("=", 1) for kv in made["driver_opts"]["o"].split(","))
    assert made["driver_opts"]["type"] == "overlay" and opts["lowerdir"] == cache
    assert not opts["upperdir"].startswith(cache) and not opts["workdir"].startswith(cache)
    assert call["environment"]["UV_CACHE_DIR"] == "/uv-cache"
    # afterwards: the runner's partial file is in the results, the volume and the run directory are gone
    assert json.loads(backends.runner_file(backend.results, "latest").read_text())["cell"] == "latest"
    assert fake_docker.removed_volumes == [made["name"]] and list((tmp_path / "runs").iterdir()) == []
    assert "cp -r /src/tests/golden /tmp/work/tests/" in call["command"][2]


def test_a_cache_the_container_user_cannot_write_or_an_engine_without_overlay_gives_a_private_cache(
    tmp_path, fake_docker, monkeypatch
) -> None:
    root = _repo(tmp_path)
    fake_docker.overlay_fails = True
    backends.DockerBackend(root, gpus_choice="none").run_cell("latest", CELLS["cells"]["latest"],
                                                              tmp_path / "a.log", 60)  # fmt: skip
    volumes = fake_docker.runs[-1]["volumes"]
    cache_mount = next(h for h, m in volumes.items() if m["bind"] == "/uv-cache")
    assert cache_mount != os.environ["UV_CACHE_DIR"] and pathlib.Path(cache_mount).name == "cache-private"
    assert "empty private cache" in (tmp_path / "a.log").read_text()
    if os.getuid() == 0:  # a cache owned by another user: no overlay is even tried
        fake_docker.overlay_fails = False
        os.chown(os.environ["UV_CACHE_DIR"], 4242, 4242)
        backends.DockerBackend(root, gpus_choice="none").run_cell("latest", CELLS["cells"]["latest"],
                                                                  tmp_path / "b.log", 60)  # fmt: skip
        assert (
            fake_docker.volumes_made == []
            and "not owned by the container user" in (tmp_path / "b.log").read_text()
        )


def test_containers_run_as_dymu_uid_and_never_as_root(fake_docker, monkeypatch) -> None:
    monkeypatch.setenv("DYMU_UID", "4321")
    monkeypatch.setenv("DYMU_GID", "99")
    assert backends.container_user() == (4321, 99)
    monkeypatch.delenv("DYMU_UID")
    monkeypatch.delenv("DYMU_GID")
    monkeypatch.setattr(backends.os, "getuid", lambda: 0)
    monkeypatch.setattr(backends.os, "getgid", lambda: 0)
    assert backends.container_user() == (1000, 1000)


def test_an_interrupted_matrix_kills_the_container(tmp_path, fake_docker) -> None:
    backends.LIVE.reset()
    fake_docker.on_wait = lambda container: backends.LIVE.stop()  # Ctrl-C arrives while the cell runs
    try:
        run = backends.DockerBackend(_repo(tmp_path), gpus_choice="none").run_cell(
            "latest", CELLS["cells"]["latest"], tmp_path / "c.log", 60
        )
        assert run.interrupted and fake_docker.killed == 1
        before = len(fake_docker.runs)  # a cell that starts after the interrupt starts no container
        assert (
            backends.DockerBackend(_repo(tmp_path / "x"), gpus_choice="none")
            .run_cell("latest", CELLS["cells"]["latest"], tmp_path / "d.log", 60)
            .interrupted
            and len(fake_docker.runs) == before
        )
    finally:
        backends.LIVE.reset()


PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\nAbC+/=\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("name", "value", "first_line"),
    [
        ("DYMU_UID", "root", "DYMU_UID: 'root' is not a number; "),
        ("DYMU_UID", "0", "DYMU_UID: 0 is root and containers run as a non-root user; "),
        ("DYMU_GID", "-5", "DYMU_GID: '-5' is not a number; "),
        ("DYMU_EXTRA_CA_CERT", "/etc/ssl/proxy.crt", "DYMU_EXTRA_CA_CERT: not PEM certificate text (it looks like a file path); "),
        ("DYMU_EXTRA_CA_CERT", PEM + "junk", "DYMU_EXTRA_CA_CERT: not PEM certificate text; "),
        ("DYMU_DOCKER_BASE", "Debian Bookworm", "DYMU_DOCKER_BASE: 'Debian Bookworm' is not an image reference; "),
        ("DYMU_DOCKER_BASE", "debian@sha256:12", "DYMU_DOCKER_BASE: 'debian@sha256:12' is not an image reference; "),
        ("DYMU_MODEL_DIR", "/nonexistent/ckpt", "DYMU_MODEL_DIR: /nonexistent/ckpt is not a directory; "),
        ("DYMU_BENCH_BATCH", "0", "DYMU_BENCH_BATCH: '0' is not a positive integer; "),
        ("DYMU_BENCH_NEW_TOKENS", "many", "DYMU_BENCH_NEW_TOKENS: 'many' is not a positive integer; "),
        ("DYMU_BENCH_MODEL", " ", "DYMU_BENCH_MODEL: empty; "),
        ("DYMU_MODEL_DIRS", "/tmp", "DYMU_MODEL_DIRS: unknown DYMU_ variable; "),
        ("DYMU_DOCKER_GPUS", "all", "DYMU_DOCKER_GPUS: no longer read; use nox -s matrix -- --docker-gpus"),
    ],
)  # fmt: skip
def test_bad_docker_settings_are_one_line_errors(name, value, first_line) -> None:
    import subprocess
    import sys

    from dymu.errors import DymuError
    from dymu.matrix import docker_env

    with pytest.raises(DymuError) as err:
        docker_env.check({name: value})
    assert str(err.value).startswith(first_line) and "\n" not in str(err.value)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYMU_")} | {name: value}
    done = subprocess.run([sys.executable, "-m", "dymu.matrix.docker_env"], env=env, cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 2 and done.stderr.splitlines() == [f"dymu: error: {err.value}"], done.stderr


def test_good_docker_settings_pass_and_the_matrix_refuses_bad_ones(tmp_path, monkeypatch) -> None:
    from dymu.matrix import docker_env, orchestrate

    good = {"DYMU_UID": "1001", "DYMU_GID": "1001", "DYMU_EXTRA_CA_CERT": PEM + PEM, "DYMU_CACHE": "/c",
            "DYMU_DOCKER_BASE": "localhost:5000/team/debian-local:bookworm@sha256:" + "0" * 64,
            "DYMU_MODEL_DIR": str(tmp_path), "DYMU_BENCH_BATCH": "8", "OTHER": "ignored"}  # fmt: skip
    assert set(docker_env.check(good)) == set(good) - {"OTHER"}
    assert set(docker_env.NAMES) | set(docker_env.RETIRED) == set(__import__("test_import_graph").ENV_VARS)
    said: list[str] = []
    monkeypatch.setenv("DYMU_UID", "abc")
    assert orchestrate.main(["--set", "quick", "--backend", "docker"], log=said.append) == 2
    monkeypatch.delenv("DYMU_UID")
    assert orchestrate.main(["--set", "quick", "--backend", "docker", "--docker-base", "Bad Image"],
                            log=said.append) == 2  # fmt: skip
    assert said[0].startswith("dymu: error: DYMU_UID: 'abc' is not a number; ")
    assert said[1].startswith("dymu: error: --docker-base: 'Bad Image' is not an image reference; ")


def test_compose_and_the_dockerfile_run_as_a_non_root_user() -> None:
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    for service in services.values():
        assert service["user"] == "${DYMU_UID:-1000}:${DYMU_GID:-1000}" and service["cap_drop"] == ["ALL"]
        assert "network_mode" not in service and "privileged" not in service
    text = (ROOT / "docker" / "Dockerfile").read_text()
    for stage in re.split(r"^FROM ", text, flags=re.M)[1:]:  # each stage ends as uid 1000, not root
        users = re.findall(r"^USER (\S+)$", stage, re.M)
        assert users and users[-1] == "1000:1000", stage.splitlines()[0]
