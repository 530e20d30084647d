"""The Docker backend: what it asks the engine for (a fake Docker SDK), compose.yaml, the
Dockerfile, the workflow, the DYMU_* settings and the GPU host checks. The same backend against a
real engine: tests/test_docker_engine.py (`nox -s docker_tests`)."""

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


def test_docker_options_come_from_the_matrix_command_line(tmp_path, fake_docker, monkeypatch) -> None:
    cell = CELLS["cells"]["latest"]
    assert backends.get_backend("docker", tmp_path).base_image(cell) == cell["image"]
    chosen = backends.get_backend("docker", tmp_path, base="debian-local:bookworm", gpus_choice="none")
    fake_docker.info = {"Runtimes": {"nvidia": {}}}
    assert chosen.base_image(cell) == "debian-local:bookworm" and chosen.gpu_request() is None
    _no_host_gpu(monkeypatch, tmp_path)
    fake_docker.info = {"Runtimes": {"runc": {}}}
    assert backends.get_backend("docker", tmp_path).gpu_request() is None  # auto: the engine has nothing
    name, request = backends.get_backend("docker", tmp_path, gpus_choice="all").gpu_request()
    assert name == "--docker-gpus all" and request["driver"] == "nvidia"


def test_docker_backend_reports_why_it_cannot_run(monkeypatch, tmp_path) -> None:
    backend = backends.get_backend("docker", tmp_path)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    reason = backend.unavailable()
    assert reason and ("Docker SDK" in reason or "no Docker engine reachable" in reason)


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
    assert any(
        '--cells "$CELL" --backend docker --expect-gpu' in step.get("run", "") for step in cell["steps"]
    )
    bench = "\n".join(step.get("run", "") for step in jobs["bench"]["steps"])
    assert bench.index("python3 -m dymu.matrix.gpu_host --cell latest") < bench.index("docker compose up")
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
        self.info = {"Runtimes": {}}
        self.images_present = True
        self.builds: list[dict] = []  # each build's keywords plus the files its context held
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
                if not fake.images_present:
                    raise fake.errors.ImageNotFound(tag)
                return tag

            def build(self, **kwargs):
                root = pathlib.Path(kwargs["path"])
                files = {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}
                fake.builds.append({**kwargs, "files": files})
                return kwargs["tag"], iter([{"stream": "built\n"}])

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
                                          "info": lambda s: fake.info, "ping": lambda s: True})()  # fmt: skip

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
        ("DYMU_CA_CERT_FILE", PEM, "DYMU_CA_CERT_FILE: certificate text, not a file path; "),
        ("DYMU_CA_CERT_FILE", "/nonexistent/proxy.crt", "DYMU_CA_CERT_FILE: /nonexistent/proxy.crt cannot be read (No such file or directory); "),
        ("DYMU_CA_CERT_FILE", "/etc", "DYMU_CA_CERT_FILE: /etc is a directory; "),
        ("DYMU_CA_CERT_FILE", str(ROOT / "pyproject.toml"), f"DYMU_CA_CERT_FILE: {ROOT / 'pyproject.toml'} holds no PEM certificate"),
        ("DYMU_EXTRA_CA_CERT", PEM, "DYMU_EXTRA_CA_CERT: no longer read; give the CA as a file: DYMU_CA_CERT_FILE="),
        ("DYMU_DOCKER_CA_CERT", PEM, "DYMU_DOCKER_CA_CERT: no longer read; give the CA as a file: DYMU_CA_CERT_FILE="),
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

    bundle = tmp_path / "bundle.pem"
    bundle.write_text("# a bundle's comment line\n" + PEM + PEM)
    good = {"DYMU_UID": "1001", "DYMU_GID": "1001", "DYMU_CA_CERT_FILE": str(bundle), "DYMU_CACHE": "/c",
            "DYMU_DOCKER_BASE": "localhost:5000/team/debian-local:bookworm@sha256:" + "0" * 64,
            "DYMU_MODEL_DIR": str(tmp_path), "DYMU_BENCH_BATCH": "8", "OTHER": "ignored"}  # fmt: skip
    assert set(docker_env.check(good)) == set(good) - {"OTHER"}
    assert docker_env.check({**good, "DYMU_CI_TOOLS": "/tmp/tools"}).keys() == docker_env.check(good).keys()
    assert set(docker_env.NAMES) | set(docker_env.RETIRED) | docker_env.NOT_DOCKER == set(
        __import__("test_import_graph").ENV_VARS
    )
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
        # HOME is set after the last root RUN: an install as root would leave ~/.cache root's (bench-cpu
        # then failed with PermissionError: /home/dymu/.cache/dymu)
        if "HOME=" in stage:
            assert stage.rindex("HOME=/home/dymu") > stage.rindex("\nRUN "), stage.splitlines()[0]


def _no_host_gpu(monkeypatch, tmp_path) -> None:
    """This host as one without the NVIDIA hook or CDI specs, whatever the machine running the test has."""
    from dymu.matrix import gpu_host

    monkeypatch.setattr(gpu_host.shutil, "which", lambda name: None)
    monkeypatch.setattr(gpu_host, "CDI_DIRS", (str(tmp_path / "no-cdi"),))


def test_the_ca_file_goes_into_the_build_context_whole_never_into_a_build_argument(tmp_path, fake_docker,
                                                                                   monkeypatch) -> None:  # fmt: skip
    """A bundle over 128 KiB (the cap on one build argument / env variable, where the old
    EXTRA_CA_CERT argument failed) reaches the build as docker/ca/extra-ca.pem, byte for byte; the
    failed-build containers are removed (forcerm); another CA gives another image tag."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(PEM * 3000)
    assert bundle.stat().st_size > 128 * 1024
    root = _repo(tmp_path)
    for part in backends.BUILD_FILES:
        (root / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / part, root / part)
    fake_docker.images_present = False
    backend = backends.DockerBackend(root, base="debian-local:bookworm")
    monkeypatch.setenv("DYMU_CA_CERT_FILE", str(bundle))
    with (tmp_path / "b.log").open("w") as log:
        with_ca = backend.image(CELLS["cells"]["latest"], log)
    monkeypatch.delenv("DYMU_CA_CERT_FILE")
    with (tmp_path / "b.log").open("w") as log:
        without = backend.image(CELLS["cells"]["latest"], log)
    first, second = fake_docker.builds
    assert (
        first["files"]["docker/ca/extra-ca.pem"] == bundle.read_bytes()
        and second["files"]["docker/ca/extra-ca.pem"] == b""
    )
    assert first["files"]["docker/Dockerfile"] == (ROOT / "docker" / "Dockerfile").read_bytes()
    assert first["dockerfile"] == "docker/Dockerfile" and first["target"] == "cell"
    assert first["forcerm"] is True and first["rm"] is True
    assert set(first["buildargs"]) == {"BASE_IMAGE", "PYTHON"}
    assert all(len(v) < 1024 for v in first["buildargs"].values())
    assert with_ca != without and with_ca.startswith(without + "-ca") and "-ca" not in without.split(":")[1]
    assert not pathlib.Path(first["path"]).exists(), "the temporary build context is removed"


def test_dockerfile_and_compose_take_the_ca_as_a_file() -> None:
    yaml = pytest.importorskip("yaml")
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "EXTRA_CA_CERT" not in text and "ARG CA" not in text
    stages = {s.split()[2]: s for s in re.split(r"^FROM ", text, flags=re.M)[1:]}
    assert "COPY docker/ca/ " in stages["cell"] and "setup.sh" in stages["cell"]
    assert "--mount=type=secret,id=dymu_ca" in stages["bench"] and "/run/secrets/dymu_ca" in stages["bench"]
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert compose["secrets"] == {"dymu_ca": {"file": "${DYMU_CA_CERT_FILE:-/dev/null}"}}
    for service in compose["services"].values():
        assert service["build"]["secrets"] == ["dymu_ca"]
        assert not any("CA" in name for name in service["build"]["args"])


def test_bench_and_bench_cpu_are_different_images_and_reports_are_never_created_by_the_engine() -> None:
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert services["bench"]["image"] != services["bench-cpu"]["image"]
    for service in services.values():
        [reports] = [v for v in service["volumes"] if isinstance(v, dict) and v["target"] == "/reports"]
        assert reports["source"] == "./reports/compose" and reports["bind"]["create_host_path"] is False


def test_a_ca_file_with_a_private_key_is_refused(tmp_path) -> None:
    from dymu.errors import DymuError
    from dymu.matrix import docker_env

    key = tmp_path / "proxy.pem"
    key.write_text(PEM + "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n")
    with pytest.raises(DymuError, match=r"holds a private key; give only the CA certificate"):
        docker_env.check({"DYMU_CA_CERT_FILE": str(key)})


def test_the_repositorys_docker_folder_is_not_taken_for_the_sdk(monkeypatch, tmp_path) -> None:
    """From the repository root without the SDK, `import docker` finds the repo's docker/ folder
    (a namespace package without from_env): the backend and the real-engine gate must read that
    as 'no SDK' (it was an AttributeError at collection)."""
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, "docker", raising=False)
    no_sdk = [p for p in sys.path if not (pathlib.Path(p or ".") / "docker" / "__init__.py").is_file()]
    monkeypatch.setattr(sys, "path", [str(ROOT), *no_sdk])
    importlib.invalidate_caches()
    with pytest.raises(ImportError, match=r"found .*docker, not the Docker SDK"):
        backends.docker_sdk()
    assert sys.modules["docker"].__file__ is None  # it really was the folder
    reason = backends.DockerBackend(tmp_path).unavailable()
    assert reason.startswith("the docker backend needs the Docker SDK next to nox")
    monkeypatch.delitem(sys.modules, "docker")


def test_the_sdk_and_urllib3_do_not_log_debug_lines(fake_docker, tmp_path, monkeypatch) -> None:
    import logging

    for name in ("docker", "urllib3"):  # as nox leaves them: everything reaches its DEBUG root handler
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger(), "level", logging.DEBUG)
    assert logging.getLogger("urllib3.connectionpool").isEnabledFor(logging.DEBUG)
    backends.DockerBackend(tmp_path)._client()
    for name in ("urllib3.connectionpool", "docker.api.build", "docker.utils.config"):
        assert not logging.getLogger(name).isEnabledFor(logging.DEBUG)
        assert logging.getLogger(name).isEnabledFor(logging.WARNING)


def test_a_cell_expecting_a_gpu_on_an_engine_without_one_is_refused_as_gpu_missing(tmp_path, fake_docker,
                                                                                   monkeypatch) -> None:  # fmt: skip
    _no_host_gpu(monkeypatch, tmp_path)
    cell = {**CELLS["cells"]["latest"], "expect_gpu": True}
    run = backends.DockerBackend(_repo(tmp_path)).run_cell("latest", cell, tmp_path / "g.log", 60)
    assert run.refused[0] == "gpu-missing" and "engine offers none" in run.refused[1]
    assert fake_docker.runs == [] and fake_docker.builds == []  # nothing built, nothing started
    assert outcome.classify(None, "", False, refused=run.refused) == run.refused
    # the same cell without the expectation runs on the CPU, and says so in its log
    run = backends.DockerBackend(_repo(tmp_path / "x")).run_cell("latest", CELLS["cells"]["latest"],
                                                                tmp_path / "c.log", 60)  # fmt: skip
    assert run.refused is None and fake_docker.runs[-1]["device_requests"] == []
    assert "GPUs: none (the engine has no nvidia runtime" in (tmp_path / "c.log").read_text()


@pytest.mark.parametrize(
    ("info", "hook", "cdi", "driver", "device"),
    [
        ({"Runtimes": {"nvidia": {}}}, None, None, "nvidia", {"count": -1, "capabilities": [["gpu"]]}),
        ({"Runtimes": {"runc": {}}}, "nvidia-container-runtime-hook", None, "nvidia", {"count": -1, "capabilities": [["gpu"]]}),
        ({"Runtimes": {"runc": {}}}, None, "cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices: []\n", "cdi", {"device_ids": ["nvidia.com/gpu=all"]}),
    ],
    ids=["runtime", "hook", "cdi"],
)  # fmt: skip
def test_gpus_go_in_through_whichever_mechanism_the_engine_has(tmp_path, fake_docker, monkeypatch, info, hook,
                                                               cdi, driver, device) -> None:  # fmt: skip
    from dymu.matrix import gpu_host

    monkeypatch.setattr(gpu_host.shutil, "which", lambda name: f"/usr/bin/{name}" if name == hook else None)
    specs = tmp_path / "cdi"
    specs.mkdir()
    (specs / "other.yaml").write_text("cdiVersion: 0.5.0\nkind: vendor.com/fpga\n")
    if cdi:
        (specs / "nvidia.yaml").write_text(cdi)
    monkeypatch.setattr(gpu_host, "CDI_DIRS", (str(specs),))
    monkeypatch.setattr(gpu_host, "host_driver", lambda: "580.82.07")
    fake_docker.info = info
    cell = {**CELLS["cells"]["latest"], "expect_gpu": True}
    run = backends.DockerBackend(_repo(tmp_path)).run_cell("latest", cell, tmp_path / "g.log", 60)
    assert run.refused is None
    [request] = fake_docker.runs[-1]["device_requests"]
    assert request.kwargs == {"driver": driver, **device}
    assert fake_docker.runs[-1]["command"][2].rstrip().endswith("--expect-gpu")


def test_an_old_driver_refuses_a_cuda_13_cell_before_the_build(tmp_path, fake_docker, monkeypatch) -> None:
    from dymu.matrix import gpu_host

    fake_docker.info = {"Runtimes": {"nvidia": {}}}
    monkeypatch.setattr(gpu_host, "host_driver", lambda: "575.57.08")
    run = backends.DockerBackend(_repo(tmp_path)).run_cell(
        "latest", CELLS["cells"]["latest"], tmp_path / "d.log", 60
    )
    assert run.refused[0] == "driver-too-old" and fake_docker.runs == [] and fake_docker.builds == []
    assert "575.57.08 is older than CUDA 13.0" in run.refused[1] and ">= 580.65.06" in run.refused[1]
    # the reference cell's CUDA 12.1 base runs on that driver
    run = backends.DockerBackend(_repo(tmp_path / "r")).run_cell("reference", CELLS["cells"]["reference"],
                                                                tmp_path / "r.log", 60)  # fmt: skip
    assert run.refused is None and len(fake_docker.runs) == 1


def test_driver_floors_follow_nvidias_table() -> None:
    from dymu.errors import DymuError
    from dymu.matrix import gpu_host

    assert gpu_host.cuda_of_image("nvidia/cuda:13.0.0-base-ubuntu22.04") == (13, 0)
    assert gpu_host.cuda_of_image(
        "registry.local:5000/nvidia/cuda:12.4.1-base-ubuntu22.04@sha256:" + "0" * 64
    ) == (12, 4)
    assert gpu_host.cuda_of_image("debian:bookworm") is None and gpu_host.cuda_of_image("mycuda:13.0") is None
    assert gpu_host.driver_problem("debian:bookworm", "390.1") is None
    assert gpu_host.driver_problem("nvidia/cuda:12.4.1-base-ubuntu22.04", "550.54.14") is None
    assert "older than CUDA 12.4" in gpu_host.driver_problem(
        "nvidia/cuda:12.4.1-base-ubuntu22.04", "545.29.06"
    )
    assert gpu_host.driver_problem("nvidia/cuda:13.0.0-base-ubuntu22.04", "580.65.06") is None
    assert gpu_host.driver_problem("nvidia/cuda:13.0.0-base-ubuntu22.04", "1000.1") is None
    assert gpu_host.driver_problem("nvidia/cuda:13.0.0-base-ubuntu22.04", None) is None  # unknown: not judged
    assert gpu_host.required_driver((12, 10)) == ("575.51.03", False)  # not in the table: a lower bound
    with pytest.raises(DymuError, match=r"CUDA 14\.0: not in the driver table"):
        gpu_host.required_driver((14, 0))
    every_base = {c["image"] for c in CELLS["cells"].values()}  # each base the matrix uses has an exact floor
    for image in every_base:
        assert gpu_host.required_driver(gpu_host.cuda_of_image(image))[1] is True, image


def test_the_host_driver_comes_from_nvidia_smi_or_the_kernel_module(tmp_path) -> None:
    import subprocess
    import types

    from dymu.matrix import gpu_host

    proc = tmp_path / "version"
    proc.write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.133.20  Fri Mar 14 2025\nGCC version: 12\n"
    )
    smi = lambda *a, **k: types.SimpleNamespace(returncode=0, stdout="580.82.07\n580.82.07\n")  # noqa: E731
    assert gpu_host.host_driver(smi, proc) == "580.82.07"

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    assert gpu_host.host_driver(missing, proc) == "570.133.20"
    failing = lambda *a, **k: types.SimpleNamespace(returncode=9, stdout="NVIDIA-SMI has failed")  # noqa: E731
    assert gpu_host.host_driver(failing, tmp_path / "absent") is None

    def hung(*a, **k):
        raise subprocess.TimeoutExpired("nvidia-smi", 60)

    assert gpu_host.host_driver(hung, proc) == "570.133.20"


def test_the_gpu_host_check_is_one_line(monkeypatch, capsys) -> None:
    import subprocess
    import sys

    from dymu.errors import DymuError
    from dymu.matrix import gpu_host

    monkeypatch.setattr(gpu_host, "host_driver", lambda: "535.261.03")
    with pytest.raises(
        DymuError, match=r"^the host's NVIDIA driver 535.261.03 is older than CUDA 13.0 .*>= 580.65.06"
    ):
        gpu_host.main(["--cell", "latest"])
    assert gpu_host.main(["--cell", "reference"]) == 0 and "runs CUDA 12.1" in capsys.readouterr().out
    monkeypatch.setattr(gpu_host, "host_driver", lambda: None)
    with pytest.raises(DymuError, match=r"^NVIDIA driver: not found on this host"):
        gpu_host.main([])
    done = subprocess.run([sys.executable, "-m", "dymu.matrix.gpu_host", "--cell", "nope"], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"dymu: error: --cell nope: no such cell; give one of {', '.join(CELLS['cells'])}"
    ]
    done = subprocess.run([sys.executable, "-m", "dymu.matrix.gpu_host", "--image", "debian:bookworm"], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and "not a CUDA image" in done.stdout


def test_a_refused_cell_is_recorded_with_its_class_and_expect_gpu_changes_the_digest(
    tmp_path, monkeypatch
) -> None:
    from dymu.matrix import orchestrate

    class Refusing:
        name = "stub"
        results = tmp_path / "cells"

        def run_cell(self, name, cell, log_path, timeout):
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text("not started\n")
            return backends.CellRun(None, False, refused=("gpu-missing", "the engine offers none"))

    cell = {**CELLS["cells"]["reference"], "expect_gpu": True}
    result = orchestrate.run_one(Refusing(), "reference", cell, 60, known=[])
    assert (
        outcome.outcome(result) == "gpu-missing"
        and result["failure"]["signature"] == "the engine offers none"
    )
    assert result["as_expected"] is False and result["runner_started"] is False
    assert orchestrate.cell_digest(cell) != orchestrate.cell_digest(CELLS["cells"]["reference"])
    assert cells.runner_args("reference", cell, "o.json", "docker")[-1] == "--expect-gpu"
    seen = {}
    monkeypatch.setattr(
        orchestrate, "_run_members", lambda data, members, *a: seen.update(data["cells"]) or 0
    )
    monkeypatch.setattr(orchestrate.backends.LocalBackend, "unavailable", lambda self: None)
    monkeypatch.setattr(orchestrate, "ROOT", tmp_path)
    assert orchestrate.main(["--set", "quick", "--expect-gpu"], log=lambda s: None) == 0
    assert [n for n, c in seen.items() if c.get("expect_gpu")] == CELLS["sets"]["quick"]


def test_a_runner_that_expects_a_gpu_and_sees_none_fails_as_gpu_missing(tmp_path, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    from dymu.matrix import runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = runner.run("reference", tmp_path / "r.json", ROOT / "tests" / "golden" / "reference.json",
                        expect_gpu=True)  # fmt: skip
    assert result["status"] == "fail" and result["failed_stages"] == ["gpu"]
    assert set(result["stages"]) == {"import", "gpu"}  # nothing ran on the CPU
    assert result["failure"]["class"] == "gpu-missing" and outcome.outcome(result) == "gpu-missing"
    assert "torch.cuda.is_available() is False in a cell that expects a GPU" in result["failure"]["signature"]
    assert json.loads((tmp_path / "r.json").read_text())["failure"]["class"] == "gpu-missing"
