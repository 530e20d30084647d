"""The DYMU_* environment variables of the Docker backend and compose.yaml, checked before use.

compose substitutes whatever is set, and a misspelt name or a malformed value (certificate text
in DYMU_CA_CERT_FILE, DYMU_UID=root) would surface minutes later inside a build or a
container, if at all. The Docker backend checks them when it starts; for compose, run
`python -m dymu.matrix.docker_env` first (the GPU workflow does). Every DYMU_* name must be one of
NAMES: the project reads no other, so an unknown one is a mistake. Standard library only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from ..errors import DymuError, run_main

IMAGE_UID = IMAGE_GID = 1000  # the `dymu` user docker/Dockerfile creates
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REF = re.compile(
    rf"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*"  # [registry[:port]/]path
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"  # [:tag][@digest]
)
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----\s*([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----")
RETIRED = {
    "DYMU_DOCKER_GPUS": "use nox -s matrix -- --docker-gpus auto|all|none",
    "DYMU_EXTRA_CA_CERT": "give the CA as a file: DYMU_CA_CERT_FILE=/path/to/ca.pem",  # PEM text (128 KiB cap)
    "DYMU_DOCKER_CA_CERT": "give the CA as a file: DYMU_CA_CERT_FILE=/path/to/ca.pem",
}


def check_image_ref(thing: str, value: str) -> str:
    """`name[:tag][@sha256:<64 hex>]`, the forms `docker build --build-arg BASE_IMAGE=` accepts."""
    if not IMAGE_REF.match(value):
        raise DymuError(f"{thing}: {value!r} is not an image reference; "
                        "give name[:tag][@sha256:<64 hex digits>], e.g. debian:bookworm-slim")  # fmt: skip
    return value


def check_digest(thing: str, value: str) -> str:
    """`sha256:` and 64 lowercase hex digits, as `docker inspect` prints a repo digest's second half."""
    if not DIGEST.match(value):
        raise DymuError(f"{thing}: {value!r} is not an image digest; give sha256:<64 lowercase hex digits> "
                        "as `docker inspect --format '{{index .RepoDigests 0}}' <image>` prints it after '@'")  # fmt: skip
    return value


def _ca_file(thing: str, value: str) -> str:
    """A readable file of PEM certificates (one proxy CA or a whole system bundle, e.g.
    /etc/ssl/certs/ca-certificates.crt): passed as a file, since a bundle is larger than the
    128 KiB one build argument or environment variable may hold."""
    if "-----BEGIN" in value:
        raise DymuError(f"{thing}: certificate text, not a file path; save it to a file and give its path, "
                        f"e.g. {thing}=/etc/ssl/certs/ca-certificates.crt")  # fmt: skip
    path = Path(value)
    try:
        text = path.read_text(errors="replace")
    except IsADirectoryError:
        raise DymuError(
            f"{thing}: {value} is a directory; give one PEM file (a bundle of several CAs is fine)"
        ) from None
    except OSError as err:
        raise DymuError(f"{thing}: {value} cannot be read ({err.strerror}); give the path of a PEM file "
                        "(README, Docker: how to find your proxy's CA)") from None  # fmt: skip
    if "PRIVATE KEY-----" in text:
        raise DymuError(f"{thing}: {value} holds a private key; give only the CA certificate(s), never a key")
    if not _PEM.search(text):
        raise DymuError(f"{thing}: {value} holds no PEM certificate (-----BEGIN CERTIFICATE-----); "
                        "convert a DER file with `openssl x509 -inform der -in ca.der -out ca.pem`")  # fmt: skip
    return value


def _id(thing: str, value: str) -> str:
    if not value.isdigit():
        raise DymuError(f"{thing}: {value!r} is not a number; give a numeric id, e.g. {thing}=$(id -u)")
    if int(value) == 0:
        raise DymuError(
            f"{thing}: 0 is root and containers run as a non-root user; give your own id: $(id -u)"
        )
    return value


def _positive(thing: str, value: str) -> str:
    if not value.isdigit() or int(value) < 1:
        raise DymuError(f"{thing}: {value!r} is not a positive integer; give e.g. {thing}=8")
    return value


def _directory(thing: str, value: str) -> str:
    if not Path(value).is_dir():
        raise DymuError(
            f"{thing}: {value} is not a directory; give a directory on this host (it is mounted read-only)"
        )
    return value


def _nonempty(thing: str, value: str) -> str:
    if not value.strip():
        raise DymuError(f"{thing}: empty; unset it for the default or give a value")
    return value


# name -> its check; every name is documented in README.md (tests/test_import_graph.py checks)
NAMES: dict[str, Callable[[str, str], str]] = {
    "DYMU_CACHE": _nonempty,  # where the tiny model is built (dymu.testing.tiny)
    "DYMU_CA_CERT_FILE": _ca_file,  # a PEM file of CAs the images trust (backend and compose builds)
    "DYMU_UID": _id,  # the user containers run as (backend and compose)
    "DYMU_GID": _id,
    "DYMU_DOCKER_BASE": check_image_ref,  # compose's base image; the Docker tests' local base
    "DYMU_MODEL_DIR": _directory,  # compose: host folders mounted read-only at /model and /data
    "DYMU_DATA_DIR": _directory,
    "DYMU_BENCH_MODEL": _nonempty,  # compose: `dymu bench` arguments
    "DYMU_BENCH_DATA": _nonempty,
    "DYMU_BENCH_NEW_TOKENS": _positive,
    "DYMU_BENCH_BATCH": _positive,
}


# DYMU_* names that belong to the project's scripts, not to the Docker path: never refused here
# (.ci/run reads DYMU_CI_TOOLS, the folder of its nox/uv venv)
NOT_DOCKER = frozenset({"DYMU_CI_TOOLS"})


def check(environ: Mapping[str, str]) -> dict[str, str]:
    """The DYMU_* variables that are set, each checked; DymuError (one line) for the first bad one."""
    found = {}
    for name in sorted(k for k in environ if k.startswith("DYMU_") and k not in NOT_DOCKER):
        if name in RETIRED:
            raise DymuError(f"{name}: no longer read; {RETIRED[name]}")
        if name not in NAMES:
            raise DymuError(f"{name}: unknown DYMU_ variable; unset it or use one of {', '.join(NAMES)}")
        found[name] = NAMES[name](name, environ[name])
    return found


def main() -> int:
    """`python -m dymu.matrix.docker_env`: exit 0 and one line when every DYMU_* variable is valid."""
    found = check(os.environ)
    print(f"dymu: docker environment ok ({', '.join(found) or 'no DYMU_ variables set'})")
    return 0


if __name__ == "__main__":
    run_main(main)
