"""The package's floors (ARCHITECTURE.md, "Floors"): imports only go down, no circles,
function-level imports only for optional dependencies, no version branches or environment
reads in the pure floors, and one documented name per environment variable."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
from import_graph import ROOT, build, circles

FLOORS = {  # module (or package prefix) -> floor, from the ground up
    0: ["dymu.errors", "dymu.atomic", "dymu.options", "dymu.versions", "dymu.jsonsafe", "dymu.devices"],
    1: ["dymu.merge", "dymu.scatter", "dymu.segment_mean", "dymu.rope", "dymu.images"],
    2: ["dymu.blocks", "dymu.cuda_graph", "dymu.tower", "dymu.expand_rope", "dymu.vtu", "dymu.prefill_graph",
        "dymu.static_decode", "dymu.fused_rows", "dymu.calibration", "dymu.thresholds"],
    3: ["dymu.compat", "dymu.compat.registry", "dymu.compat.shims", "dymu.compat.legacy"],
    4: ["dymu.families", "dymu.checkpoints", "dymu.vision_loading"],
    5: ["dymu.api", "dymu.generation", "dymu.decode_loop"],
    6: ["dymu", "dymu.__main__", "dymu.cli", "dymu.quiet", "dymu.bench", "dymu.matrix", "dymu.testing", "dymu.compat.checks",
        "dymu.data"],
}  # fmt: skip
# top-level packages a function may import: optional dependencies that are absent in some cells
OPTIONAL = {"llava", "triton", "docker", "requests", "skimage", "matplotlib", "pycocoevalcap", "jsonschema"}
# DYMU_CACHE: the tiny model's cache; the rest: the Docker backend's and compose's settings, checked
# by dymu/matrix/docker_env.py (DYMU_DOCKER_GPUS, DYMU_EXTRA_CA_CERT and DYMU_DOCKER_CA_CERT are retired:
# named only to refuse them with the fix)
ENV_VARS = {"DYMU_CACHE", "DYMU_CA_CERT_FILE", "DYMU_UID", "DYMU_GID", "DYMU_DOCKER_BASE", "DYMU_MODEL_DIR",
            "DYMU_DATA_DIR", "DYMU_BENCH_MODEL", "DYMU_BENCH_DATA", "DYMU_BENCH_NEW_TOKENS", "DYMU_BENCH_BATCH",
            "DYMU_DOCKER_GPUS", "DYMU_EXTRA_CA_CERT", "DYMU_DOCKER_CA_CERT",
            "DYMU_CI_TOOLS"}  # fmt: skip  # .ci/run's tools venv: named in docker_env only to let it pass
GRAPH = build()


def floor(module: str) -> int:
    """The floor of the most specific entry that names the module or one of its packages."""
    best = None
    for level, names in FLOORS.items():
        for name in names:
            if (module == name or module.startswith(name + ".")) and (
                best is None or len(name) > len(best[1])
            ):
                best = (level, name)
    if best is None:
        raise AssertionError(f"{module} has no floor: add it to FLOORS")
    return best[0]


def test_every_module_has_a_floor_and_imports_only_go_down() -> None:
    upward = [f"{a} ({floor(a)}) -> {b} ({floor(b)})" for a, targets in GRAPH.edges.items() for b in targets
              if floor(b) > floor(a)]  # fmt: skip
    assert upward == []


def test_there_are_no_import_circles() -> None:
    assert circles(GRAPH) == []


def test_a_planted_circle_is_found(tmp_path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    graph = build(pkg, tmp_path)
    assert circles(graph) == [["pkg.a", "pkg.b"]] and graph.local_imports == [("pkg.b", 2, "pkg.a")]


def test_function_level_imports_are_only_for_optional_dependencies() -> None:
    bad = [f"{m}:{line} imports {what}" for m, line, what in GRAPH.local_imports
           if what.split(".")[0] not in OPTIONAL]  # fmt: skip
    assert bad == []


@pytest.mark.parametrize("level", [0, 1, 2])
def test_lower_floors_read_no_versions_and_no_environment(level: int) -> None:
    for module, path in GRAPH.modules.items():
        if floor(module) != level:
            continue
        text = path.read_text()
        assert "os.environ" not in text and "getenv" not in text, module
        assert not GRAPH.edges[module] & {"dymu.versions", "dymu.compat"}, module
        if level < 2:  # the math knows no models
            assert not re.search(r"^\s*(from|import) transformers", text, re.M), module


def test_environment_variables_are_few_and_documented() -> None:
    used = set()
    for path in (ROOT / "dymu").rglob("*.py"):
        used |= set(re.findall(r"DYMU_(?!SPEC)[A-Z_]+", path.read_text()))
    assert used <= ENV_VARS, used - ENV_VARS
    readme = (ROOT / "README.md").read_text()
    assert all(name in readme for name in ENV_VARS), [n for n in ENV_VARS if n not in readme]


def test_version_numbers_are_written_only_in_the_patch_data() -> None:
    """A runtime module that compares against a release number is a branch the TOML does not know."""
    pattern = re.compile(r"(at_least|Version)\(\s*[\"']\d")
    offenders = [
        str(p.relative_to(ROOT)) for p in (ROOT / "dymu").rglob("*.py") if pattern.search(p.read_text())
    ]
    assert offenders == []


def test_the_import_graph_sees_function_level_imports() -> None:
    tree = ast.parse("def f():\n    import triton\n")
    assert isinstance(tree.body[0].body[0], ast.Import)
    assert any(m == "dymu.expand_rope" and w.startswith("triton") for m, _, w in GRAPH.local_imports)


def test_source_checkout_root_is_the_project() -> None:
    assert (ROOT / "patches" / "fixes.toml").is_file() and pathlib.Path(__file__).parent == ROOT / "tests"
