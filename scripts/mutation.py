"""Mutation testing of dymu's core modules with mutmut, one module group at a time (`nox -s mutation`).

Each group gets a copy of the tree in .nox/mutation/<group>/ whose pyproject.toml names the group's
modules and the fast tests that cover them ([tool.mutmut]); `mutmut run` mutates them there and
runs, for each mutant, the tests that reach the mutated function. The counts and the surviving
mutants (with their diffs) go to .nox/mutation/<group>.json, a summary to stdout. Slow tests (the
ViT-L geometry tower, held-out calibration, subprocess tests, compat's per-fix checks) are left out to
keep a run bounded.

    python scripts/mutation.py [GROUP ...] [--jobs N]    # default: every group, 2 jobs
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".nox" / "mutation"
COPY = ("dymu", "tests", "patches", "envs", "pyproject.toml", "README.md")
FAST = "not vitl and not cuda and not held_out and not fresh_process and not found_them"

# group -> (modules to mutate, pytest selection: the fast tests that cover them)
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "merge": (["dymu/merge.py"], ["tests/test_merge_rules.py", "tests/test_tower_invariants.py", "-k", FAST]),
    "scatter": (["dymu/scatter.py"], ["tests/test_scatter.py", "tests/test_vtu_core.py", "-k", FAST]),
    "vtu": (["dymu/vtu.py", "dymu/expand_rope.py"],
            ["tests/test_vtu_core.py", "tests/test_expand_rope.py", "tests/test_prefill_graph.py", "-k", FAST]),
    "decode": (["dymu/static_decode.py", "dymu/decode_loop.py"],
               ["tests/test_graph_decode.py", "tests/test_generation_units.py", "-k", f"{FAST} and not legacy"]),
    "thresholds": (["dymu/thresholds.py"], ["tests/test_thresholds.py", "tests/test_bad_input.py", "-k", FAST]),
    "calibration": (["dymu/calibration.py"],  # test_calibrate's repeatability (ViT-L geometry) and PIL tests: slow
                    ["tests/test_calibration_rules.py", "tests/test_calibrate.py", "tests/test_merge_rules.py", "-k",
                     f"{FAST} and not is_repeatable and not from_pil_images"]),
    "generation": (["dymu/generation.py"],  # the hf family only: the legacy one runs the same generation code
                   ["tests/test_generation_units.py", "tests/test_families.py", "-k",
                    f"{FAST} and not fidelity and not legacy"]),
    # compat: the per-shim unit tests and test_compat's fast ones; its per-fix checks (verify + negative
    # control, every fix, seconds each, reaching every shim through `active`) run in every cell's CI instead
    "compat": (["dymu/compat/shims.py", "dymu/compat/registry.py"],
               ["tests/test_shims.py", "tests/test_compat.py", "-k",
                f"{FAST} and not fix_holds_and and not check_all_reports and not disabling_the_causal"]),
    "matrix": (["dymu/matrix/outcome.py", "dymu/matrix/golden.py", "dymu/matrix/report.py"],
               ["tests/test_matrix.py", "tests/test_matrix_verdicts.py", "tests/test_golden.py",
                "tests/test_report_page.py", "-k",
                f"{FAST} and not interrupted_matrix_run"]),  # that one starts a whole matrix in a child
}  # fmt: skip
STATUSES = ("killed", "survived", "no tests", "timeout", "suspicious", "skipped", "not checked", "segfault")


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def prepare(group: str) -> Path:
    """A fresh copy of the tree for one group, configured for mutmut."""
    modules, selection = GROUPS[group]
    folder = WORK / group
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, folder / name)
    config = "\n".join([
        "", "[tool.mutmut]", 'source_paths = ["dymu"]', f"only_mutate = {_toml_list(modules)}",
        'also_copy = ["patches", "envs", "README.md"]',
        f"pytest_add_cli_args_test_selection = {_toml_list(selection)}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]',
        'process_isolation = "forkserver"', "",
    ])  # fmt: skip
    with (folder / "pyproject.toml").open("a", encoding="utf-8") as f:
        f.write(config)
    return folder


NO_GRAD = "@torch.no_grad()"
NO_GRAD_FIXTURE = """

@pytest.fixture(autouse=True)
def _mutation_no_grad():
    \"\"\"scripts/mutation.py took @torch.no_grad() off the mutated modules' functions: every test runs
    without grad instead, as those functions did.\"\"\"
    with torch.no_grad():
        yield
"""


def _undecorate(folder: Path, modules: list[str]) -> list[str]:
    """mutmut 3 does not mutate decorated functions, so in the copy the mutated modules lose their
    `@torch.no_grad()` lines (generation.prepare, stock_prepare, generate_prepared; golden.run_case)
    and the copy's tests/conftest.py runs every test under no_grad. Returns the functions changed."""
    changed = []
    for module in modules:
        path = folder / module
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.strip() != NO_GRAD]
        if len(kept) != len(lines):
            changed += [f"{module}:{nxt.split('(')[0].split()[-1]}" for line, nxt in itertools.pairwise(lines)
                        if line.strip() == NO_GRAD]  # fmt: skip
            path.write_text("".join(kept), encoding="utf-8")
    if changed:
        with (folder / "tests" / "conftest.py").open("a", encoding="utf-8") as f:
            f.write(NO_GRAD_FIXTURE)
    return changed


# groups whose CUDA-only code runs on CPU tensors in Triton's interpreter when it is on before triton is
# imported (tests/test_expand_rope.py's in-process check; elsewhere that check runs in a subprocess)
INTERPRETED = {"vtu"}


def mutmut(
    folder: Path, *args: str, timeout: int | None = None, group: str = ""
) -> subprocess.CompletedProcess:
    exe = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or shutil.which("mutmut")
    if exe is None:
        raise SystemExit("mutmut is not installed in this environment (pip install mutmut)")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    if group in INTERPRETED:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([exe, *args], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)


def run_group(group: str, jobs: int) -> dict:
    """Mutate one group and collect its verdicts."""
    folder = prepare(group)
    undecorated = _undecorate(folder, GROUPS[group][0])
    done = mutmut(folder, "run", "--max-children", str(jobs), group=group)
    listing = mutmut(folder, "results", "--all", "true").stdout
    verdicts: dict[str, str] = {}
    for line in listing.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name and status in STATUSES:
            verdicts[name] = status
    counts = {
        s: sum(v == s for v in verdicts.values()) for s in STATUSES if any(v == s for v in verdicts.values())
    }
    survivors = {
        n: mutmut(folder, "show", n).stdout for n, s in verdicts.items() if s in ("survived", "no tests")
    }
    result = {"group": group, "modules": GROUPS[group][0], "tests": GROUPS[group][1], "counts": counts,
              "exit_code": done.returncode, "survivors": survivors, "undecorated": undecorated,
              "log_tail": (done.stdout + done.stderr)[-2000:] if done.returncode else ""}  # fmt: skip
    (WORK / f"{group}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", help=f"any of {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown groups {unknown}; known: {', '.join(GROUPS)}")
    WORK.mkdir(parents=True, exist_ok=True)
    code = 0
    for group in args.groups or list(GROUPS):
        result = run_group(group, args.jobs)
        counts = result["counts"]
        tested = counts.get("killed", 0) + counts.get("survived", 0) + counts.get("timeout", 0)
        score = (counts.get("killed", 0) + counts.get("timeout", 0)) / tested if tested else 0.0
        print(f"{group:<12} {score:6.1%} killed of {tested} tested  {counts}")
        for name in result["survivors"]:
            print(f"    survived: {name}")
        if result["exit_code"] not in (0, None) and tested == 0:  # mutmut could not run this group at all
            print(f"    {group}: mutmut failed before testing any mutant (see {WORK / group}.json, log_tail)")
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
