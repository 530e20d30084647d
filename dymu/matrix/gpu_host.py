"""The NVIDIA side of a Docker host: how the engine can hand GPUs to a container, which driver the
host runs, and whether that driver is new enough for a cell's CUDA base image.

Why here and not left to the engine: an engine without a registered `nvidia` runtime can still
pass GPUs (the NVIDIA hook or CDI), and one that cannot runs every cell on the CPU without a word;
an old driver makes the NVIDIA runtime refuse a CUDA 13 image only once the image is built and
the cell's packages are downloaded. Both are decided here before anything is built.

`python -m dymu.matrix.gpu_host [--cell NAME | --image REF]` checks this host's driver against a
cell's (default: `latest`, compose's `bench`) base image: one line, exit 0 or 2 (the workflow runs it).
Standard library only.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import DymuError, run_main
from . import cells

# The NVIDIA driver each CUDA release needs (Linux x86_64, the GA release of each minor version), from
# NVIDIA's CUDA Toolkit Release Notes, Table 3 "CUDA Toolkit and Corresponding Driver Versions"
# (https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/). The nvidia/cuda images set
# NVIDIA_REQUIRE_CUDA="cuda>=<major.minor>" and the NVIDIA container runtime refuses to start one on a
# driver whose CUDA version is lower, so the floor is this GA driver, not the lower "minor version
# compatibility" floor (525.60.13 for any 12.x, 580.65.06 for any 13.x; Table 2 there).
MIN_DRIVER: dict[tuple[int, int], str] = {
    (12, 0): "525.60.13",
    (12, 1): "530.30.02",
    (12, 2): "535.54.03",
    (12, 3): "545.23.06",
    (12, 4): "550.54.14",
    (12, 5): "555.42.02",
    (12, 6): "560.28.03",
    (12, 8): "570.26",
    (12, 9): "575.51.03",
    (13, 0): "580.65.06",
}
TABLE = "NVIDIA CUDA Toolkit Release Notes, Table 3"
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")  # the CDI spec directories the engine reads by default
HOOKS = ("nvidia-container-runtime-hook", "nvidia-container-toolkit")  # what dockerd's `nvidia` driver needs
_CUDA_IMAGE = re.compile(r"(?:^|/)nvidia/cuda:(\d+)\.(\d+)")
_DRIVER = re.compile(r"^\d+\.\d+(?:\.\d+)?$")


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def cuda_of_image(image: str) -> tuple[int, int] | None:
    """The CUDA (major, minor) of an nvidia/cuda image reference, None for any other image."""
    found = _CUDA_IMAGE.search(image)
    return (int(found[1]), int(found[2])) if found else None


def required_driver(cuda: tuple[int, int]) -> tuple[str, bool]:
    """(driver floor, exact) for a CUDA release: the table's entry, else the newest entry of the same
    major below it (a lower bound, `exact` False); DymuError for a major the table does not know."""
    if cuda in MIN_DRIVER:
        return MIN_DRIVER[cuda], True
    below = [key for key in MIN_DRIVER if key[0] == cuda[0] and key < cuda]
    if not below:
        raise DymuError(f"CUDA {cuda[0]}.{cuda[1]}: not in the driver table; add it to MIN_DRIVER in "
                        f"dymu/matrix/gpu_host.py from the {TABLE}")  # fmt: skip
    return MIN_DRIVER[max(below)], False


def host_driver(run: Callable[..., Any] = subprocess.run,
                proc_version: Path = Path("/proc/driver/nvidia/version")) -> str | None:  # fmt: skip
    """This host's NVIDIA driver version (nvidia-smi, else the kernel module's /proc file), None
    when neither says (no driver, or a remote engine's host)."""
    try:
        done = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                   capture_output=True, text=True, timeout=60)  # fmt: skip
        lines = done.stdout.split() if done.returncode == 0 else []
        if lines and _DRIVER.match(lines[0]):
            return lines[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        found = re.search(r"Kernel Module\s+(\d+\.\d+(?:\.\d+)?)", proc_version.read_text())
    except OSError:
        return None
    return found[1] if found else None


def driver_problem(image: str, driver: str | None) -> str | None:
    """Why `driver` cannot run `image` on the GPU (one line), None when it can or the image has no
    CUDA; an unknown driver is not a problem here (the caller says it was not checked)."""
    cuda = cuda_of_image(image)
    if cuda is None or driver is None:
        return None
    floor, exact = required_driver(cuda)
    if version_tuple(driver) >= version_tuple(floor):
        return None
    return (f"the host's NVIDIA driver {driver} is older than CUDA {cuda[0]}.{cuda[1]} ({image}) needs: "
            f">= {floor}{'' if exact else ' at least'} ({TABLE}); upgrade the driver or run this cell "
            "without GPUs (--docker-gpus none)")  # fmt: skip


def gpu_request(info: Mapping[str, Any], which: Callable[[str], str | None] | None = None,
                cdi_dirs: Iterable[str] | None = None) -> tuple[str, dict[str, Any]] | None:  # fmt: skip
    """How this engine can give a container every NVIDIA GPU, as (mechanism, DeviceRequest keywords),
    None when it has no way. `info` is the engine's `docker info`. In order: a registered `nvidia`
    runtime or the NVIDIA hook on the host (dockerd's built-in `nvidia` device driver: what
    `docker run --gpus all` uses), else a CDI spec naming nvidia.com/gpu devices (what
    `docker run --device nvidia.com/gpu=all` uses). The hook and the CDI specs are looked up on this
    host, i.e. where the engine runs when DOCKER_HOST is local; --docker-gpus all|none overrides."""
    if "nvidia" in (info.get("Runtimes") or {}):
        return "the engine's nvidia runtime", {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}
    which = which or shutil.which
    hook = next((name for name in HOOKS if which(name)), None)
    if hook:
        return f"the NVIDIA hook ({hook})", {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}
    for directory in list(cdi_dirs if cdi_dirs is not None else info.get("CDISpecDirs") or CDI_DIRS):
        for spec in sorted(Path(directory).glob("*")):
            try:
                text = spec.read_text(errors="replace") if spec.suffix in (".yaml", ".yml", ".json") else ""
            except OSError:
                continue
            if re.search(r"""kind["']?\s*:\s*["']?nvidia\.com/gpu""", text):
                return f"CDI ({spec})", {"driver": "cdi", "device_ids": ["nvidia.com/gpu=all"]}
    return None


def main(argv: list[str] | None = None) -> int:
    """Exit 0 with one line when this host's driver can run the cell's CUDA image, else DymuError."""
    parser = argparse.ArgumentParser(
        prog="python -m dymu.matrix.gpu_host", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--cell", default="latest", help="the cell whose base image to check (default: latest)"
    )
    parser.add_argument("--image", help="an image reference instead of a cell's")
    args = parser.parse_args(argv)
    data = cells.load()
    if args.image is None and args.cell not in data["cells"]:
        raise DymuError(f"--cell {args.cell}: no such cell; give one of {', '.join(data['cells'])}")
    image = args.image or cells.image_ref(data["cells"][args.cell])
    cuda = cuda_of_image(image)
    if cuda is None:
        print(f"dymu: {image} is not a CUDA image: no driver needed")
        return 0
    driver = host_driver()
    if driver is None:
        raise DymuError("NVIDIA driver: not found on this host (no nvidia-smi, no /proc/driver/nvidia/version); "
                        "install the driver or run on a GPU host")  # fmt: skip
    problem = driver_problem(image, driver)
    if problem:
        raise DymuError(problem)
    print(
        f"dymu: NVIDIA driver {driver} runs CUDA {cuda[0]}.{cuda[1]} ({image}; needs >= {required_driver(cuda)[0]})"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
