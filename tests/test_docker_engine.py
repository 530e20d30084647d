"""The Docker backend against a real Docker engine: `nox -s docker_tests` (which installs the
Docker SDK, builds the offline base when missing and fails on a skip). Elsewhere (CI, `nox -s
tests`) these skip: they need a reachable engine and DYMU_DOCKER_BASE naming a local base image.
No torch here: the session runs them with --noconftest in a venv without it."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil

import pytest

from dymu.matrix import backends, cells, outcome

ROOT = pathlib.Path(__file__).resolve().parents[1]
CELLS = cells.load()
SYSTEM_BUNDLE = pathlib.Path("/etc/ssl/certs/ca-certificates.crt")


def _engine_and_base() -> str | None:
    """The local base image when an engine is reachable and has it, else None (skip). The SDK goes
    through backends.docker_sdk(): from the repository root without the SDK, `import docker` finds
    the repository's docker/ folder, which must read as 'no SDK', not as an AttributeError."""
    base = os.environ.get("DYMU_DOCKER_BASE")
    if not base:
        return None
    try:
        docker = backends.docker_sdk()
    except ImportError:
        return None
    try:
        docker.from_env().images.get(base)
    except docker.errors.DockerException:  # no engine reachable, or no such image there
        return None
    return base


BASE = _engine_and_base()
pytestmark = pytest.mark.skipif(
    BASE is None, reason="needs a Docker engine and DYMU_DOCKER_BASE (a local base)"
)


def _client():
    return backends.docker_sdk().from_env()


def _run(tmp_path, script: str, timeout: float, image: str | None = None, **options):
    log = tmp_path / "c.log"
    with log.open("w") as f:
        run = backends.DockerBackend(tmp_path).run_container(
            image or BASE, script, f, timeout, labels={"dymu.test": tmp_path.name}, **options
        )
    left = _client().containers.list(all=True, filters={"label": f"dymu.test={tmp_path.name}"})
    assert not left, "the container must be removed"
    return run, log.read_text()


def _repo_copy(tmp_path) -> pathlib.Path:
    """A copy of what the backend needs (the container mounts it, so host symlinks would dangle)."""
    root = tmp_path / "repo"
    root.mkdir()
    for part in ("dymu", "patches", "tests/golden", "docker", "pyproject.toml", "README.md"):
        src, dst = ROOT / part, root / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_file():
            shutil.copy(src, dst)
        else:
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_a_hung_container_is_killed_at_the_timeout(tmp_path) -> None:
    run, log = _run(tmp_path, "echo started; sleep 120", timeout=3)
    assert run.timed_out and run.returncode is None and "started" in log
    assert outcome.classify(run.returncode, log, run.timed_out)[0] == "timeout"


def test_a_process_that_kills_itself_is_a_crash_not_ignored_as_pid_1(tmp_path) -> None:
    run, log = _run(tmp_path, "echo before; kill -9 $$; echo after", timeout=60)
    assert run.returncode == 137 and "after" not in log
    assert outcome.classify(run.returncode, log, run.timed_out) == ("crash", "killed by signal 9")


def test_an_out_of_memory_kill_is_classified_as_oom(tmp_path) -> None:
    run, log = _run(tmp_path, "head -c 400m /dev/zero | tail > /dev/null", timeout=120,
                    mem_limit="64m", memswap_limit="64m")  # fmt: skip
    assert run.oom_killed and "OOMKilled" in log, (run, log)
    assert outcome.classify(run.returncode, log, run.timed_out, run.oom_killed)[0] == "oom"


@pytest.mark.skipif(not SYSTEM_BUNDLE.is_file(), reason="no system CA bundle on this host")
def test_the_whole_system_bundle_is_the_images_ca_and_reaches_pypi_quietly(
    tmp_path, monkeypatch, caplog
) -> None:
    """DYMU_CA_CERT_FILE = the ~220 KB system bundle (over the 128 KiB a build argument may hold):
    the cell image builds, trusts it, a container of it (non-root, bridge network) fetches a
    package from PyPI with it, and neither the SDK nor urllib3 logs a DEBUG line (they used to log
    whole build URLs, CA text included)."""
    assert SYSTEM_BUNDLE.stat().st_size > 128 * 1024
    monkeypatch.setenv("DYMU_CA_CERT_FILE", str(SYSTEM_BUNDLE))
    caplog.set_level(logging.DEBUG)
    backend = backends.DockerBackend(_repo_copy(tmp_path), base=BASE)
    with (tmp_path / "build.log").open("w") as log:
        image = backend.image(CELLS["cells"]["latest"], log)
    assert "-ca" in image.split(":", 1)[1], image  # the CA's digest is part of the tag
    noisy = [
        r
        for r in caplog.records
        if r.name.split(".")[0] in ("docker", "urllib3") and r.levelno < logging.WARNING
    ]
    assert noisy == [] and "BEGIN CERTIFICATE" not in caplog.text
    uid, gid = backends.container_user()
    script = ("id -u; python3.11 -m venv /tmp/v && /tmp/v/bin/pip download -q --no-deps -d /tmp/d six "
              "&& ls /tmp/d && grep -c 'BEGIN CERTIFICATE' $SSL_CERT_FILE")  # fmt: skip
    run, log = _run(
        tmp_path, script, timeout=300, image=image, user=f"{uid}:{gid}", environment={"HOME": "/tmp"}
    )
    assert run.returncode == 0, log
    lines = log.split()
    assert lines[0] == str(uid) and any(n.startswith("six-") and n.endswith(".whl") for n in lines), log


def test_a_failed_image_build_leaves_no_stopped_container(tmp_path) -> None:
    client = _client()
    before = {c.id for c in client.containers.list(all=True)}
    backend = backends.DockerBackend(_repo_copy(tmp_path), base=BASE)
    impossible = {**CELLS["cells"]["latest"], "python": "3.99"}  # no python3.99 package: the apt step fails
    with (tmp_path / "build.log").open("w") as log, pytest.raises(backends.docker_sdk().errors.BuildError):
        backend.image(impossible, log)
    after = {c.id for c in client.containers.list(all=True)}
    assert after - before == set(), "the failed step's build container must be removed"


def test_a_cell_that_expects_a_gpu_is_refused_where_the_engine_offers_none(tmp_path) -> None:
    """On an engine without an nvidia runtime, NVIDIA hook or CDI spec (this machine), a cell marked
    as needing a GPU is refused as gpu-missing before any build, instead of passing on the CPU; on
    one with a mechanism, it is not refused for that reason."""
    backend = backends.DockerBackend(_repo_copy(tmp_path), base=BASE)
    cell = {**CELLS["cells"]["reference"], "expect_gpu": True}
    request = backend.gpu_request()
    if request is None:
        run = backend.run_cell("reference", cell, tmp_path / "ref.log", timeout=60)
        assert run.refused and run.refused[0] == "gpu-missing" and run.returncode is None
        assert "expects a GPU and the engine offers none" in (tmp_path / "ref.log").read_text()
        assert _client().containers.list(all=True, filters={"label": "dymu.cell=reference"}) == []
    else:
        with (tmp_path / "gpu.log").open("w") as log:
            refusal = backend.gpu_refusal(cell, request, log)
        assert refusal is None or refusal[0] == "driver-too-old", refusal
