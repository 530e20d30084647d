"""The matrix plumbing that needs no cell env: cell validation, failure classes, the report."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from dymu.matrix import backends, cells, orchestrate, outcome, report
from dymu.matrix.backends import only_gpus
from dymu.matrix.runner import failure_summary

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_shipped_cells_are_valid_and_sets_name_real_cells() -> None:
    data = cells.load()
    assert {"reference", "latest"} <= set(data["cells"])
    assert set(data["sets"]["quick"]) <= set(data["cells"])
    assert "f-4.41-oldest" in data["cells"], "dotted cell names must be quoted in TOML"
    assert data["cells"]["reference"]["image"] == "nvidia/cuda:12.1.1-base-ubuntu22.04"
    assert all(c["image"].startswith("nvidia/cuda:") for c in data["cells"].values())


def test_a_cell_without_a_base_image_is_rejected(tmp_path) -> None:
    text = (
        (ROOT / "envs" / "cells.toml")
        .read_text()
        .replace('"2.15" = "nvidia/cuda:13.0.0-base-ubuntu22.04"', "")
    )
    (tmp_path / "cells.toml").write_text(text)
    with pytest.raises(ValueError, match=r"no CUDA base image for torch 2\.15"):
        cells.load(tmp_path / "cells.toml")


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ({"torch": "2.1.2", "transformers": "5.0.0", "companions": ["numpy<2"]}, "needs torch >= 2.2"),
        ({"torch": "2.4.1", "transformers": "5.20.0"}, "needs torch >= 2.6"),
        ({"torch": "2.1.2", "transformers": "4.56.2", "companions": ["numpy<2"]}, "needs torch >= 2.2"),
        ({"torch": "2.1.2", "transformers": "4.37.2"}, "needs numpy<2"),
        ({"41-oldest": {"torch": "2.1.2"}}, "missing python, torch, transformers"),
        (
            {"torch": "2.9.1", "transformers": "4.57.3", "disable_fix": ["causal-mask"]},
            "unknown key 'disable_fix'",
        ),
        ({"torch": "2.9.1", "transformers": "4.57.3", "self_kill": "yes"}, "self_kill must be a bool"),
        ({"torch": "2.9.1", "transformers": "4.57.3", "expect": "fail"}, "expect 'fail' is not one of"),
    ],
)
def test_invalid_pairings_are_rejected_with_the_reason(cell, message) -> None:
    cell = {"python": "3.11", **cell} if "torch" in cell else cell
    with pytest.raises(ValueError, match=message):
        cells.validate("bad", cell, cells.load()["torch_floors"])


def test_failure_classes_come_from_how_the_process_ended() -> None:
    assert outcome.classify(None, "step 1\nstep 2", timed_out=True) == ("timeout", "step 2")
    assert outcome.classify(-9, "running", False) == ("crash", "killed by signal 9")
    assert outcome.classify(137, "running", False) == ("crash", "killed by signal 9")
    assert outcome.classify(-9, "running", False, oom_killed=True)[0] == "oom"
    assert outcome.classify(1, "Traceback\nMemoryError", False) == ("oom", "MemoryError")
    assert outcome.classify(0, "see issue -9 in the log", False)[0] == "crash"  # no "-9" guessing from text
    assert outcome.classify(1, "uv venv failed\nerror: No interpreter found", False, runner_started=False) == (
        "install-failure", "error: No interpreter found")  # fmt: skip
    cls, sig = outcome.classify(1, "Traceback\n  File x\nTypeError: forward() got an unexpected keyword argument 'cache'",
                                False)  # fmt: skip
    assert cls == "crash" and "unexpected keyword argument 'cache'" in sig
    known = outcome.known_signatures()
    assert any(__import__("re").search(k, sig) for k in known), "a documented fix error must count as known"


def _cell(name: str, status: str, needed: str, negative: str, **extra) -> dict:
    return {
        "cell": name, "status": status, "versions": {"torch": "2.15.0", "transformers": "5.24.0"},
        "stages": {
            "import": {"status": "pass"},
            "fixes": {"status": status, "fixes": [
                {"fix": "cache-rename", "needed": needed, "verify": "held", "negative": negative},
                {"fix": "tokenizer", "needed": "no", "verify": "n.a.", "negative": "n.a."},
            ]},
            "bench": {"status": "pass", "ratio_stock_over_dymu": 1.25},
        },
        **extra,
    }  # fmt: skip


def _failed(name: str, cls: str, signature: str, expected: str = "pass", known: bool = False) -> dict:
    """A cell result that failed as `cls`; as the matrix records it, it is as expected exactly when
    its outcome (`cls`, `/known` added for a documented signature) is its `expect`."""
    failure = {"class": cls, "signature": signature, "known": known}
    return {"cell": name, "status": "fail", "expected": expected, "failure": failure,
            "as_expected": cls + ("/known" if known else "") == expected}  # fmt: skip


def _write_cells(folder: pathlib.Path, results: dict[str, dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, cell in results.items():
        (folder / f"{name}.json").write_text(json.dumps(cell))


def test_report_renders_verdicts_and_flags_unexpected(tmp_path) -> None:
    folder = tmp_path / "cells"
    folder.mkdir()
    (folder / "good.json").write_text(json.dumps(_cell("good", "pass", "yes", "failed as documented")))
    (folder / "bad.json").write_text(json.dumps(_cell("bad", "fail", "yes", "did not fail")))
    (folder / "killed.json").write_text(json.dumps(_failed("killed", "crash", "killed (SIGKILL)", "crash")))
    (folder / "torn.json").write_text("{not json")
    data = report.build(tmp_path)
    rows = {r["cell"]: r for r in data["summary"]}
    assert rows["good"]["fixes"]["cache-rename"] == "fixed" and rows["good"]["as_expected"]
    assert rows["bad"]["fixes"]["cache-rename"] == "FAIL" and not rows["bad"]["as_expected"]
    assert rows["killed"]["as_expected"] and rows["torn"]["failure"]["class"] == "unreadable"
    markdown = (tmp_path / "matrix.md").read_text()
    assert "| good |" in markdown and "unexpected" in markdown and "killed (SIGKILL)" in markdown
    assert (tmp_path / "matrix.html").read_text().startswith("<!doctype html>")
    assert json.loads((tmp_path / "matrix.json").read_text())["schema"] == 1


def _status_cells(folder) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """Each row's status cell: Markdown text, and (background, text) in the HTML table."""
    md = {}
    for line in (folder / "matrix.md").read_text().splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cols) > 4 and cols[0] != "cell":
            md[cols[0]] = cols[4]
    page = {}
    for row in re.findall(r"<tr>(.*?)</tr>", (folder / "matrix.html").read_text()):
        tds = re.findall(r"<td style='background:([^']*)'>(.*?)</td>", row)
        if len(tds) > 4:
            page[tds[0][1]] = tds[4]
    return md, page


def test_an_expected_failure_renders_as_expected_not_as_pass_or_failure(tmp_path) -> None:
    """A broken cell that fails as its `expect` says reads `expected <outcome>` (yellow in HTML):
    not `pass`, not the red failure an unforeseen outcome gets."""
    _write_cells(tmp_path / "cells", {
        "good": _cell("good", "pass", "yes", "failed as documented"),
        "no-mask": _failed("no-mask", "stage-failure", "AttributeError: no _update_causal_mask",
                           "stage-failure/known", known=True),
        "killed": _failed("killed", "crash", "killed (SIGKILL)", "crash"),
        "surprise": _failed("surprise", "crash", "Segfault"),
    })  # fmt: skip
    report.build(tmp_path)
    md, page = _status_cells(tmp_path)
    assert md == {"good": "pass", "no-mask": "expected stage-failure/known", "killed": "expected crash",
                  "surprise": "**fail (unexpected)**"}  # fmt: skip
    assert page == {"good": ("#d4f7d4", "pass"), "no-mask": ("#fff3c4", "expected stage-failure/known"),
                    "killed": ("#fff3c4", "expected crash"), "surprise": ("#f7d4d4", "fail (unexpected)")}  # fmt: skip


def test_report_shows_the_full_size_stage_of_gpu_cells(tmp_path) -> None:
    (tmp_path / "cells").mkdir()
    (tmp_path / "gpu" / "cells").mkdir(parents=True)
    stage = {"status": "pass", "device": "NVIDIA H200", "checks": {
        "identity": {"status": "pass", "cache_relative_error": 3.4e-05},
        "bf16-rounding": {"status": "pass", "stock_low_vs_fp32": {"cache_relative_error": 0.168},
                          "dymu_low_vs_fp32": {"cache_relative_error": 0.161}},
        "dymu": {"status": "pass", "visual_tokens": [13, 142]}},
        "bench": {"rows": [{"batch_size": 8, "ratios_stock_over_dymu": {"vision": 0.75, "prefill": 1.9}}]}}  # fmt: skip
    gpu = _cell("gpu-tf4.37.2", "pass", "yes", "failed as documented")
    gpu["stages"]["full-size"] = stage
    (tmp_path / "gpu" / "cells" / "gpu-tf4.37.2.json").write_text(json.dumps(gpu))
    cpu = _cell("cpu", "pass", "yes", "failed as documented")
    cpu["stages"]["full-size"] = {"status": "n.a.", "why": "no CUDA device"}
    (tmp_path / "cells" / "cpu.json").write_text(json.dumps(cpu))
    rows = {r["cell"]: r for r in report.build(tmp_path)["summary"]}
    assert rows["gpu-tf4.37.2"]["where"] == "gpu" and rows["gpu-tf4.37.2"]["stages"]["full-size"] == "pass"
    assert rows["cpu"]["stages"]["full-size"] == "n.a." and rows["cpu"]["full_size"] is None
    markdown = (tmp_path / "matrix.md").read_text()
    line = next(x for x in markdown.splitlines() if x.startswith("| gpu-tf4.37.2 | NVIDIA H200 |"))
    assert "0.168 / 0.161" in line and "| 0.75 | 1.90 |" in line
    assert "<h2>Full-size stage (GPU cells)</h2>" in (tmp_path / "matrix.html").read_text()


def test_outcome_names_the_class_and_whether_the_signature_is_known() -> None:

    assert outcome.outcome({"status": "pass"}) == "pass"
    mask_error = "AttributeError: 'LlamaModel' object has no attribute '_update_causal_mask'"
    stages = {
        "inference": {"status": "fail", "cases": {"a": {"status": "fail", "error": mask_error},
                                                  "b": {"status": "pass"}}},
        "golden": {"status": "fail", "cases": {"a": {"status": "fail", "problems": ["greedy_ids differ"]}}},
        "fixes": {"status": "fail", "fixes": [{"fix": "causal-mask", "verify": "failed", "detail": mask_error}]},
    }  # fmt: skip
    known = failure_summary(stages, ["inference", "fixes"])
    assert known["known"] and known["signature"] == mask_error
    assert outcome.outcome({"status": "fail", "failure": known}) == "stage-failure/known"
    unknown = failure_summary(stages, ["inference", "golden"])  # a silent drift matches no fix
    assert not unknown["known"]
    assert outcome.outcome({"status": "fail", "failure": unknown}) == "stage-failure"


def test_backend_is_picked_by_name_and_runs_a_logged_process_with_a_timeout(tmp_path) -> None:

    assert isinstance(backends.get_backend("local", tmp_path), backends.LocalBackend)
    with pytest.raises(ValueError, match="available: docker, local"):
        backends.get_backend("kubernetes", tmp_path)
    log = tmp_path / "logs" / "c.log"
    done = backends.run_logged(
        [sys.executable, "-c", "print('hello'); raise SystemExit(3)"], log, 60, tmp_path
    )
    assert (done.returncode, done.timed_out) == (3, False) and "hello" in log.read_text()
    hung = backends.run_logged([sys.executable, "-c", "import time; time.sleep(30)"], log, 1, tmp_path)
    assert hung.timed_out and hung.returncode is None


def test_cells_take_the_defaults_and_their_own_python() -> None:
    data = cells.load()
    seed, latest = data["cells"]["seed"], data["cells"]["latest"]
    assert seed["python"] == "3.10" and latest["python"] == data["defaults"]["python"]
    assert latest["legacy"] == data["defaults"]["legacy"] and data["cells"]["self-kill"]["legacy"] == []
    assert latest["companions"][: len(data["defaults"]["companions"])] == data["defaults"]["companions"]
    assert cells.torch_floor("5.24.0", data["torch_floors"]) == (2, 6)
    assert cells.torch_floor("4.51.3", data["torch_floors"]) is None


def test_fault_keys_reach_the_runner_as_arguments() -> None:
    data = cells.load()
    args = cells.runner_args("seed-no-mask", data["cells"]["seed-no-mask"], "out.json", "local")
    assert args[-2:] == ["--disable-fixes", "causal-mask"]
    assert "--self-kill" in cells.runner_args("self-kill", data["cells"]["self-kill"], "o.json", "docker")
    assert "--self-kill" not in cells.runner_args("latest", data["cells"]["latest"], "o.json", "docker")


def test_matrix_selects_sets_and_cells_and_refuses_unknown_ones(capsys) -> None:

    data = cells.load()
    assert orchestrate.select(data, "quick", None) == data["sets"]["quick"]
    assert orchestrate.select(data, "quick", ["latest"]) == ["latest"]
    with pytest.raises(ValueError, match="unknown cells: nope"):
        orchestrate.select(data, "core", ["nope"])
    assert orchestrate.main(["--set", "broken", "--list"]) == 0
    assert capsys.readouterr().out.split() == data["sets"]["broken"]
    assert orchestrate.main(["--set", "nosuchset", "--list"], log=print) == 2


def test_the_matrix_package_imports_without_torch() -> None:
    """nox's interpreter runs the matrix loop, the report and the cell list with no torch installed."""

    code = ("import sys; import dymu.matrix.orchestrate, dymu.matrix.report, dymu.matrix.runner, dymu.matrix.junit; "
            "sys.exit(('torch' in sys.modules) + 2 * ('transformers' in sys.modules))")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_a_hung_cell_is_killed_with_its_whole_process_group(tmp_path) -> None:

    pidfile = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            f"open({str(pidfile)!r}, 'w').write(str(c.pid)); time.sleep(600)")  # fmt: skip
    started = time.time()
    run = backends.run_logged([sys.executable, "-c", code], tmp_path / "log", 3, tmp_path)
    assert run.timed_out and time.time() - started < 30
    child = int(pidfile.read_text())
    for _ in range(50):  # the grandchild is gone too (checked by PID), not re-parented and running
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {child} survived its cell's timeout")


def test_a_real_memory_limit_is_classed_oom(tmp_path) -> None:

    code = "import resource; resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20)); x = bytearray(2 << 30)"
    run = backends.run_logged([sys.executable, "-c", code], tmp_path / "log", 60, tmp_path)
    cls, signature = outcome.classify(
        run.returncode, (tmp_path / "log").read_text(), run.timed_out, run.oom_killed
    )
    assert run.returncode == 1 and cls == "oom" and "MemoryError" in signature


def test_a_second_matrix_run_on_one_checkout_is_refused(tmp_path) -> None:

    (tmp_path / "reports").mkdir()
    with orchestrate.checkout_lock(tmp_path):  # this process holds it; another process must not get it
        code = ("import sys, pathlib; from dymu.matrix import orchestrate\n"
                "try:\n    with orchestrate.checkout_lock(pathlib.Path(sys.argv[1])): print('got it')\n"
                "except orchestrate.LockHeld as err: print('refused:', err)")  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT
        )
    assert done.stdout.startswith("refused: another matrix run holds") and "pid" in done.stdout, done.stderr
    with orchestrate.checkout_lock(tmp_path):  # released: a later run gets it
        pass


def test_freshness_follows_the_whole_cell_definition() -> None:

    cell = cells.load()["cells"]["latest"]
    result = {"code": "c", "status": "pass", "cell_digest": orchestrate.cell_digest(cell)}
    assert orchestrate.is_fresh(result, "c", cell)
    for change in ({"companions": [*cell["companions"], "x"]}, {"legacy": []}, {"expect": "crash"},
                   {"disable_fixes": ["scatter"]}, {"python": "3.10"}):  # fmt: skip
        assert not orchestrate.is_fresh(result, "c", {**cell, **change}), change
    assert not orchestrate.is_fresh(result, "other code", cell)


@pytest.mark.parametrize("name", ["../../../x", "a/b", ".hidden", "x" * 80])
def test_unsafe_cell_names_are_refused(name) -> None:
    with pytest.raises(ValueError, match="file names"):
        cells.validate(name, {"python": "3.11", "torch": "2.15.0", "transformers": "5.24.0"}, {})


def test_matrix_arguments_and_files_fail_in_one_line(tmp_path, monkeypatch) -> None:

    said = []
    assert orchestrate.main(["--timeout", "abc"], log=said.append) == 2
    assert orchestrate.main(["--set"], log=said.append) == 2
    assert orchestrate.main(["--bogus"], log=said.append) == 2
    assert all(line.startswith("matrix: error:") and "\n" not in line for line in said), said
    (tmp_path / "cells.toml").write_text("[cells\n")
    monkeypatch.setattr(cells, "CELLS_FILE", tmp_path / "cells.toml")
    monkeypatch.setattr(cells.load, "__defaults__", (tmp_path / "cells.toml",))
    assert orchestrate.main(["--list"], log=said.append) == 2 and "not valid TOML" in said[-1]


def test_report_of_a_folder_without_results_says_so(tmp_path, capsys) -> None:
    assert report.main([str(tmp_path / "nonexistent")]) == 2
    assert "no cell results" in capsys.readouterr().err and not (tmp_path / "nonexistent").exists()


class _Holding:
    """A stand-in backend: each cell holds `seconds`, then fails with a planted error; every cell's
    (name, GPU ids, start, end) is recorded, so a test sees what ran at the same time."""

    name = "holding"

    def __init__(self, results: pathlib.Path, seconds: float) -> None:
        self.results, self.seconds = results, seconds
        self.seen: list[tuple[str, tuple[str, ...], float, float]] = []
        self._lock = threading.Lock()

    def unavailable(self):
        return None

    def run_cell(self, name, cell, log_path, timeout):
        start = time.monotonic()
        time.sleep(self.seconds)
        with self._lock:
            self.seen.append((name, tuple(cell.get("gpu_ids") or ()), start, time.monotonic()))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("boom\nRuntimeError: planted\n")
        return backends.CellRun(1, False)

    def most_at_once(self) -> int:
        return max(sum(1 for *_, s, e in self.seen if s <= t < e) for *_, t, _ in self.seen)


def _run_holding(tmp_path, monkeypatch, seconds: float, argv: list[str]) -> _Holding:
    """orchestrate.main with every cell a `_Holding` stand-in (reports under tmp_path)."""
    holding = _Holding(tmp_path / "reports" / "cells", seconds)
    monkeypatch.setattr(orchestrate, "ROOT", tmp_path)
    monkeypatch.setattr(backends, "get_backend", lambda name, root, **kw: holding)
    monkeypatch.setattr(orchestrate.report, "build", lambda reports: {"summary": []})
    assert orchestrate.main(argv, log=lambda line: None) == 0
    return holding


def test_cells_run_side_by_side_with_jobs(tmp_path, monkeypatch) -> None:
    """--jobs N runs N cells at once: two 1.5 s cells take about 1.5 s, not 3 (a stand-in backend)."""
    started = time.time()
    holding = _run_holding(tmp_path, monkeypatch, 1.5, ["--set", "quick", "--jobs", "2", "--force"])
    assert holding.most_at_once() == 2 and time.time() - started < 2.9
    results = sorted(p.name for p in (tmp_path / "reports" / "cells").glob("*.json"))
    assert results == sorted(f"{n}.json" for n in cells.load()["sets"]["quick"])


def _session_members(sessions: set[int]) -> list[str]:
    """Live (not zombie) processes whose session is one of `sessions`, read from /proc."""
    found = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone while we looked
            continue
        fields = text.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgrp, session, ...
        if fields[0] != "Z" and int(fields[3]) in sessions:
            found.append(f"{stat.parent.name} {text[:80]}")
    return found


def _strict_json(path: pathlib.Path):
    def refuse(constant: str):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGINT-ignored-by-parent"])
def test_an_interrupted_matrix_run_leaves_no_process_and_records_the_cell_as_interrupted(
    tmp_path, sig
) -> None:
    """A whole matrix run (orchestrate.main in its own process and session, a stand-in cell that
    is a real process group in mid-run) gets SIGINT (Ctrl-C) or SIGTERM (a cancelled CI job); also
    SIGINT to a run started with SIGINT ignored, as a background job (`cmd &` in a script) is."""
    ignored = sig.endswith("-ignored-by-parent")
    sig = sig.removesuffix("-ignored-by-parent")

    root, pids = tmp_path / "root", tmp_path / "pids"
    root.mkdir()
    pids.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    command = [sys.executable, str(ROOT / "tests" / "matrix_standin.py"), str(root), str(pids),
               "--set", "quick", "--force", "--timeout", "120"]  # fmt: skip
    run = subprocess.Popen(command, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           preexec_fn=_ignore_sigint if ignored else None)  # fmt: skip
    first = cells.load()["sets"]["quick"][0]
    try:
        deadline = time.time() + 30
        while not (pids / first).is_file():
            assert run.poll() is None and time.time() < deadline, (
                run.communicate()[0] if run.poll() else "no cell"
            )
            time.sleep(0.05)
        runner, child = (int(x) for x in (pids / first).read_text().split())
        alive = {int(line.split()[0]) for line in _session_members({runner})}
        assert {runner, child} <= alive, "the cell's runner and its child must be alive before the signal"
        run.send_signal(getattr(signal, sig))
        # well under the cell's 120 s timeout (a matrix that waited for it would miss this), with
        # room for a loaded 2-core machine: one CI run took over 30 s here while other jobs ran
        output = run.communicate(timeout=90)[0]
    finally:
        if run.poll() is None:  # the test failed: do not leave the run behind
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 130, output
    for _ in range(50):  # the cell's group was SIGKILLed; give the kernel a moment to reap re-parented ones
        left = _session_members({run.pid, runner})
        if not left:
            break
        time.sleep(0.1)
    assert left == [], f"processes of the interrupted run survived: {left}"
    reports = root / "reports"
    files = sorted(reports.rglob("*.json"))
    assert files and all(_strict_json(p) is not None for p in files)  # strict: no NaN / Infinity
    result = _strict_json(reports / "cells" / f"{first}.json")
    assert result["status"] == "fail" and result["failure"]["class"] == "interrupted"
    assert result["as_expected"] is False and result["runner_started"] is True
    assert outcome.outcome(result) != "pass"
    assert not (reports / "cells" / f"{first}.runner.json").exists(), (
        "the partial file is the loop's to remove"
    )
    second = cells.load()["sets"]["quick"][1]
    assert not (reports / "cells" / f"{second}.json").exists(), "a cell that never started has no result"
    summary = {r["cell"]: r for r in _strict_json(reports / "matrix.json")["summary"]}
    assert summary[first]["as_expected"] is False and "interrupted" in output


SCRIPTED_RUNNER = """
import datetime, json, os, signal, sys
out, name, mode = sys.argv[1:4]
if mode in ("started", "other-cell"):
    cell = name if mode == "started" else "someone-else"
    open(out, "w").write(json.dumps({"cell": cell, "status": "running",
                                     "started": datetime.datetime.now().isoformat()}))
if mode == "install-fails":
    print("error: Failed to download torch")
    sys.exit(1)
print("killing myself", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize(
    ("mode", "cls", "as_expected"),
    [
        ("started", "crash", True),  # the runner wrote its partial file, then died by SIGKILL
        ("never-started", "install-failure", False),  # killed before the runner began (e.g. in uv)
        ("install-fails", "install-failure", False),  # the environment could not be built
        ("other-cell", "install-failure", False),  # a partial file, but not this cell's: no evidence
    ],
)
def test_an_expected_crash_needs_evidence_that_the_runner_started(tmp_path, mode, cls, as_expected) -> None:

    class Scripted:
        name = "scripted"
        results = tmp_path / "cells"

        def run_cell(self, name, cell, log_path, timeout):
            out = backends.runner_file(self.results, name)
            return backends.run_logged([sys.executable, "-c", SCRIPTED_RUNNER, str(out), name, mode], log_path,
                                       60, tmp_path)  # fmt: skip

    Scripted.results.mkdir()
    cell = cells.load()["cells"]["self-kill"]
    assert cell["expect"] == "crash"
    result = orchestrate.run_one(Scripted(), "self-kill", cell, 60, [])
    assert result["failure"]["class"] == cls and result["as_expected"] is as_expected
    assert result["runner_started"] is (mode == "started")
    written = json.loads((tmp_path / "cells" / "self-kill.json").read_text())
    assert (
        written["as_expected"] is as_expected and not (tmp_path / "cells" / "self-kill.runner.json").exists()
    )


def test_runner_evidence_must_name_the_cell_and_its_start() -> None:

    good = {"cell": "a", "started": "2025-01-01T00:00:00+00:00", "status": "running"}
    assert orchestrate.runner_evidence(good, "a") == good
    assert orchestrate.runner_evidence(good, "b") is None
    assert orchestrate.runner_evidence({"cell": "a", "status": "running"}, "a") is None
    assert orchestrate.runner_evidence(None, "a") is None and orchestrate.runner_evidence([1], "a") is None


def test_a_stale_partial_file_is_no_evidence(tmp_path) -> None:

    partial = tmp_path / "x.runner.json"
    partial.write_text(json.dumps({"cell": "x", "started": "then", "status": "running"}))
    os.utime(partial, (1_000_000, 1_000_000))
    assert orchestrate._read(partial, started_after=2_000_000) is None
    assert orchestrate._read(partial, started_after=500_000)["cell"] == "x"


def test_base_image_digests_are_checked_and_used(tmp_path) -> None:
    text = (ROOT / "envs" / "cells.toml").read_text()
    digest = "sha256:" + "ab" * 32
    pinned = text.replace('"2.15" = "nvidia/cuda:13.0.0-base-ubuntu22.04"',
                          f'"2.15" = {{tag = "nvidia/cuda:13.0.0-base-ubuntu22.04", base_digest = "{digest}"}}')  # fmt: skip
    assert pinned != text
    (tmp_path / "cells.toml").write_text(pinned)
    latest = cells.load(tmp_path / "cells.toml")["cells"]["latest"]
    assert cells.image_ref(latest) == f"nvidia/cuda:13.0.0-base-ubuntu22.04@{digest}"
    assert cells.image_ref(cells.load()["cells"]["latest"]) == "nvidia/cuda:13.0.0-base-ubuntu22.04"
    for bad in (digest.upper(), "sha256:abc", "md5:" + "ab" * 32):
        (tmp_path / "cells.toml").write_text(pinned.replace(digest, bad))
        with pytest.raises(ValueError, match="is not sha256:<64 lowercase hex digits>"):
            cells.load(tmp_path / "cells.toml")
    (tmp_path / "cells.toml").write_text(pinned.replace("base_digest", "digest"))
    with pytest.raises(ValueError, match="unknown keys: digest"):
        cells.load(tmp_path / "cells.toml")
    own = {"python": "3.11", "torch": "2.15.0", "transformers": "5.24.0", "base_digest": digest}
    with pytest.raises(ValueError, match="set `image` too"):
        cells.validate("c", own, {})
    cells.validate("c", {**own, "image": "debian:bookworm"}, {})
    with pytest.raises(ValueError, match="base_digest 'sha256:1' is not"):
        cells.validate("c", {**own, "image": "debian:bookworm", "base_digest": "sha256:1"}, {})


def test_a_cell_whose_python_is_missing_here_is_skipped_with_the_reason(tmp_path, monkeypatch) -> None:
    """The local backend needs the cell's own interpreter: without it the cell is `skipped` (with the
    reason, in the result and the report), never run on another Python and never a failure."""

    local = backends.LocalBackend(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert "no python3.99 on this machine's PATH" in local.cannot_run({"python": "3.99"})
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "python3.99"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert local.cannot_run({"python": "3.99"}) is None

    ran = []

    class Missing(backends.LocalBackend):
        def cannot_run(self, cell):
            return "no python3.12 on this machine's PATH (the cell's Python)"

        def run_cell(self, name, cell, log_path, timeout):
            ran.append(name)
            return backends.CellRun(0, False)

    cell = cells.load()["cells"]["seed"]
    backend = Missing(tmp_path)
    backend.results.mkdir(parents=True)
    result = orchestrate.run_one(backend, "py312", cell, 60, [])
    assert (
        ran == []
        and result["status"] == "skipped"
        and result["as_expected"]
        and "python3.12" in result["skip_reason"]
    )
    (backend.results / "good.json").write_text(
        json.dumps(_cell("good", "pass", "yes", "failed as documented"))
    )
    report.build(tmp_path / "reports")
    markdown = (tmp_path / "reports" / "matrix.md").read_text()
    assert (
        "1 of 1 cells behaved as expected; none did otherwise; skipped here: py312 (see Skipped)." in markdown
    )
    assert "- **py312**: no python3.12 on this machine's PATH" in markdown and "| py312 | cpu |" in markdown
    assert "| skipped |" in markdown.split("## Skipped")[0]


def test_gpus_per_cell_gives_running_cells_their_own_gpus(tmp_path, monkeypatch) -> None:
    """--jobs 3 --gpus-per-cell 1 on two GPUs: at most two cells run at once, never on one GPU, and
    each result records the GPU it had (a stand-in backend that holds each cell for 0.6 s)."""
    argv = [
        "--cells",
        "reference,latest,seed",
        "--jobs",
        "3",
        "--gpus-per-cell",
        "1",
        "--gpu-ids",
        "0,1",
        "--force",
    ]
    holding = _run_holding(tmp_path, monkeypatch, 0.6, argv)
    seen = holding.seen
    assert sorted(n for n, *_ in seen) == ["latest", "reference", "seed"] and all(
        len(g) == 1 for _, g, *_ in seen
    )
    for a, b in itertools.combinations(seen, 2):
        if a[2] < b[3] and b[2] < a[3]:  # ran at the same time
            assert a[1] != b[1], (a, b)
    assert holding.most_at_once() == 2
    written = {n: json.loads((tmp_path / "reports" / "cells" / f"{n}.json").read_text()) for n, *_ in seen}
    assert all(written[n]["gpu_ids"] == list(g) for n, g, *_ in seen)
    assert orchestrate.cell_digest({"python": "3.11", "gpu_ids": ["1"]}) == orchestrate.cell_digest(
        {"python": "3.11"}
    )


def test_gpus_per_cell_refuses_what_it_cannot_give(monkeypatch) -> None:

    said: list[str] = []
    for argv, words in ((["--gpus-per-cell", "2", "--gpu-ids", "0"], "has 1 GPU"),
                        (["--gpus-per-cell", "-1"], "must be 0"),
                        (["--gpus-per-cell", "1", "--gpu-ids", "0,0"], "each once"),
                        (["--gpus-per-cell", "1", "--gpu-ids", "x"], "GPU indexes")):  # fmt: skip
        assert orchestrate.main(["--cells", "reference", *argv], log=said.append) == 2
        assert said[-1].startswith("dymu: error: --") and words in said[-1] and "\n" not in said[-1]
    monkeypatch.setattr(orchestrate, "host_gpu_ids", lambda: [])
    assert orchestrate.main(["--cells", "reference", "--gpus-per-cell", "1"], log=said.append) == 2
    assert "0 GPU(s) (none by nvidia-smi -L)" in said[-1]


def test_a_local_cell_sees_only_its_own_gpus(tmp_path, monkeypatch) -> None:

    log = tmp_path / "env.log"
    show = [sys.executable, "-c", "import os; print(os.environ.get('CUDA_VISIBLE_DEVICES'))"]
    assert backends.run_logged(show, log, 30, tmp_path, {"CUDA_VISIBLE_DEVICES": "1"}).returncode == 0
    assert log.read_text().strip() == "1"
    calls = []
    monkeypatch.setattr(
        backends, "run_logged", lambda *args: calls.append(args) or backends.CellRun(0, False)
    )
    local = backends.LocalBackend(tmp_path)
    local.run_cell("seed", {"gpu_ids": ["2", "3"]}, log, 30)
    local.run_cell("seed", {}, log, 30)
    assert calls[0][4] == {"CUDA_VISIBLE_DEVICES": "2,3"} and calls[1][4] is None


def test_a_docker_cell_gets_only_its_own_gpus() -> None:

    nvidia = {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}
    assert only_gpus(nvidia, ["1"]) == {"driver": "nvidia", "device_ids": ["1"], "capabilities": [["gpu"]]}
    assert only_gpus(nvidia, None) == nvidia
    cdi = {"driver": "cdi", "device_ids": ["nvidia.com/gpu=all"]}
    assert only_gpus(cdi, ["0", "1"])["device_ids"] == ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]
