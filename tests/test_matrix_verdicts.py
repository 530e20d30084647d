"""The functions that decide a cell's verdict, edge by edge: `outcome.classify` (how a cell that left
no result ended) and `outcome.outcome`, and the golden comparison's helpers (`compare`,
`case_family`, `load_golden`). Fast and model-free (the matrix mutation group runs them per mutant)."""

from __future__ import annotations

import json
import math
import sys

import pytest

from dymu.matrix import outcome, report
from dymu.matrix.golden import RECORDED, SAME_AS, case_family, compare, expected, load_golden
from dymu.testing.tiny import NOBOS

# ---------------------------------------------------------------- outcome.classify


def test_interrupted_wins_over_every_other_ending() -> None:
    got = outcome.classify(-9, "MemoryError", True, oom_killed=True, runner_started=False, interrupted=True,
                           refused=("gpu-missing", "no GPU"))  # fmt: skip
    assert got == ("interrupted", "the matrix run was interrupted and killed this cell")


def test_an_empty_log_gives_an_empty_signature() -> None:
    assert outcome.classify(None, "", True) == ("timeout", "")
    assert outcome.classify(1, "\n  \n", False) == ("crash", "")


def test_the_signature_is_read_from_the_last_40_non_blank_lines() -> None:
    early = "ValueError: too early to count"
    log = "\n".join([early, *(f"noise {i}" for i in range(40))])
    assert outcome.classify(1, log, False) == ("crash", "noise 39")
    assert outcome.classify(1, "\n".join([early, *(f"noise {i}" for i in range(39))]), False) == (
        "crash",
        early,
    )
    assert outcome.classify(1, "Error: early\n" + "\n".join(f"step {i}" for i in range(40)), False,
                            runner_started=False) == ("install-failure", "step 39")  # fmt: skip
    assert outcome.classify(None, "last words  \n\n   \n", True) == ("timeout", "last words")


def test_an_oom_kill_without_a_message_says_so() -> None:
    assert outcome.classify(-9, "loading", False, oom_killed=True) == (
        "oom",
        "killed by the kernel's OOM killer",
    )
    assert outcome.classify(1, "a\ntorch.OutOfMemoryError: CUDA out of memory.\nb", False) == (
        "oom", "torch.OutOfMemoryError: CUDA out of memory."
    )  # fmt: skip


def test_an_install_failure_names_its_last_error_line_in_any_case() -> None:
    log = "Resolving\nERROR: No matching distribution found for torch==9.9\nexit status 1"
    assert outcome.classify(1, log, False, runner_started=False) == (
        "install-failure", "ERROR: No matching distribution found for torch==9.9"
    )  # fmt: skip
    assert outcome.classify(1, "Resolving\nexit status 1", False, runner_started=False) == (
        "install-failure", "exit status 1"
    )  # fmt: skip


@pytest.mark.parametrize(("code", "signal"), [(-1, 1), (-9, 9), (129, 1), (137, 9)])
def test_signal_deaths_from_either_exit_code_convention(code: int, signal: int) -> None:
    assert outcome.classify(code, "ValueError: shadowed by the signal", False) == (
        "crash",
        f"killed by signal {signal}",
    )


@pytest.mark.parametrize("code", [0, 1, 128, None])
def test_other_exit_codes_crash_with_the_last_exception_line(code: int | None) -> None:
    log = "Traceback\nValueError: first\n  File x\nKeyError: 'last'\noserror: not an exception name\ndone"
    assert outcome.classify(code, log, False) == ("crash", "KeyError: 'last'")
    assert outcome.classify(code, "step\ndone", False) == ("crash", "done")


# ---------------------------------------------------------------- outcome.outcome


def test_outcome_defaults_for_a_result_without_status_or_class() -> None:
    assert outcome.outcome({}) == "?"
    assert outcome.outcome({"status": "fail", "failure": {}}) == "fail"  # an empty failure counts as none
    assert outcome.outcome({"status": "fail", "failure": {"known": False, "signature": "x"}}) == "fail"
    assert outcome.outcome({"status": "fail", "failure": {"known": True, "signature": "x"}}) == "fail/known"


# ---------------------------------------------------------------- golden


def _entry(logits: list[list[float]]) -> dict:
    task = {"accuracy": 0.5, "answer_ids": [[1, 2]]}
    return {"prompt_ids": [[1]], "visual_tokens": [3], "tokens_per_layer": [[4]], "mappings": [[0]],
            "greedy_ids": [[5]], "top_ids": [[6]], "top_logits": logits,
            "task": {"stock": dict(task), "dymu": dict(task)}}  # fmt: skip


def test_compare_flags_a_logit_drift_only_above_the_tolerance() -> None:
    want = _entry([[4.0, 3.0], [2.0, 1.0]])
    assert compare(_entry([[4.0, 3.0], [2.0, 1.5]]), want, 0.5) == []  # exactly atol passes
    assert compare(_entry([[4.0, 3.0], [2.0, 1.75]]), want, 0.5) == ["top_logits off by 0.75 > atol 0.5"]
    assert compare(_entry([]), _entry([]), 0.0) == []  # nothing to compare: no drift


def test_compare_refuses_logit_tables_of_different_shapes() -> None:
    want = _entry([[4.0, 3.0], [2.0, 1.0]])
    for got in ([[4.0, 3.0]], [[4.0, 3.0], [2.0]]):
        with pytest.raises(ValueError):
            compare(_entry(got), want, 1.0)


def test_compare_names_each_differing_integer_field_in_order() -> None:
    want = _entry([[1.0]])
    got = _entry([[1.0]])
    got["greedy_ids"], got["prompt_ids"] = [[9]], [[2]]
    assert compare(got, want, 0.0) == ["prompt_ids differ", "greedy_ids differ"]


def test_case_family_and_the_variant_each_case_is_compared_with() -> None:
    assert [case_family(c) for c in RECORDED] == ["hf", "hf", "legacy", "legacy"]
    assert case_family(NOBOS) == "legacy"
    golden = {"cases": {case: {"case": case} for case in RECORDED}}
    assert expected(golden, NOBOS) == {"case": SAME_AS[NOBOS]} and expected(golden, RECORDED[1]) == {
        "case": RECORDED[1]
    }


def test_load_golden_turns_stored_infinities_back_into_floats(tmp_path) -> None:
    path = tmp_path / "golden.json"
    path.write_text(
        json.dumps({"about": "café", "thresholds": [0.5, "inf", 2], "cases": {}}), encoding="utf-8"
    )
    data = load_golden(path)
    assert data["thresholds"][0] == 0.5 and math.isinf(data["thresholds"][1]) and data["thresholds"][2] == 2.0
    assert all(type(t) is float for t in data["thresholds"])
    assert data["about"] == "café" and data["cases"] == {} and set(data) == {"about", "thresholds", "cases"}


# ---------------------------------------------------------------- report: what the matrix job's exit code and rows say


def _write(folder, name: str, cell: dict | str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(
        cell if isinstance(cell, str) else json.dumps(cell), encoding="utf-8"
    )


def test_report_main_exits_1_exactly_when_a_cell_did_not_behave_as_expected(tmp_path, capsys) -> None:
    _write(tmp_path / "cells", "good", {"cell": "good", "status": "pass"})
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Compatibility matrix\n") and "| good |" in out
    assert (tmp_path / "matrix.md").read_text(encoding="utf-8") + "\n" == out
    _write(tmp_path / "cells", "broken", {"cell": "broken", "status": "fail", "expected": "crash",
                                          "as_expected": True})  # fmt: skip
    assert report.main([str(tmp_path)]) == 0  # a broken cell failing as it should
    _write(tmp_path / "cells", "bad", {"cell": "bad", "status": "fail"})  # expects a pass by default
    assert report.main([str(tmp_path)]) == 1


@pytest.mark.parametrize("sub", ["gpu/cells", "docker/cells"])
def test_report_main_reads_gpu_or_docker_results_alone(tmp_path, sub) -> None:
    _write(tmp_path / sub, "only", {"cell": "only", "status": "pass"})
    assert report.main([str(tmp_path)]) == 0 and (tmp_path / "matrix.html").is_file()


def test_report_main_defaults_to_the_reports_folder_and_reads_sys_argv(tmp_path, monkeypatch, capsys) -> None:
    _write(tmp_path / "reports" / "cells", "good", {"cell": "good", "status": "pass"})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["report"])
    assert report.main() == 0 and (tmp_path / "reports" / "matrix.md").is_file()
    _write(tmp_path / "other" / "cells", "bad", {"cell": "bad", "status": "fail"})
    monkeypatch.setattr(sys, "argv", ["report", "other"])
    assert report.main() == 1 and (tmp_path / "other" / "matrix.md").is_file()
    assert report.main([]) == 0  # an empty list is no arguments, not sys.argv
    capsys.readouterr()
    assert report.main([str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err == (
        f"dymu: error: {tmp_path / 'none'}: no cell results (cells/, gpu/cells/ or docker/cells/) to report; "
        "run `nox -s matrix` first or pass the reports folder\n"
    )


def test_fix_verdicts() -> None:
    held = {"verify": "held", "needed": "yes", "negative": "failed as documented"}
    assert report.fix_verdict(None) == "n.a." and report.fix_verdict({"verify": "n.a."}) == "n.a."
    assert report.fix_verdict(held) == "fixed"
    assert report.fix_verdict({**held, "negative": "did not fail"}) == "FAIL"
    assert report.fix_verdict({**held, "verify": "failed"}) == "FAIL"
    assert report.fix_verdict({"verify": "held", "needed": "no"}) == "ok"


def test_load_cells_reads_sorted_results_skips_runner_files_and_marks_unreadable_ones(tmp_path) -> None:
    folder = tmp_path / "cells"
    _write(folder, "b", {"cell": "b", "note": "café"})
    _write(folder, "a", {"cell": "a"})
    _write(folder, "a.runner", {"cell": "runner state"})
    _write(folder, "c", "{torn")
    try:
        json.loads("{torn")
    except json.JSONDecodeError as err:
        why = str(err)
    assert report.load_cells(folder) == [
        {"cell": "a"}, {"cell": "b", "note": "café"},
        {"cell": "c", "status": "fail", "failure": {"class": "unreadable", "signature": why}},
    ]  # fmt: skip


def test_rows_of_cpu_docker_and_gpu_cells_with_their_defaults_and_log_links(tmp_path) -> None:
    versions = {"torch": "2.9.1", "transformers": "4.57.3"}
    _write(tmp_path / "cells", "plain", {"cell": "plain", "status": "pass", "versions": versions,
                                         "stages": {"bench": {"status": "pass", "ratio_stock_over_dymu": 1.5}}})  # fmt: skip
    _write(tmp_path / "docker" / "cells", "boxed", {"cell": "boxed", "status": "pass"})
    _write(tmp_path / "gpu" / "cells", "card", {"cell": "card", "status": "pass"})
    _write(tmp_path / "gpu" / "cells", "named", {"cell": "named", "status": "pass", "where": "NVIDIA H200"})
    _write(tmp_path / "cells", "bare", {"cell": "bare"})
    for log in ("logs/plain.log", "docker/logs/boxed.log", "gpu/logs/card.log"):
        (tmp_path / log).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / log).write_text("log", encoding="utf-8")
    rows = {r["cell"]: r for r in report.build(tmp_path)["summary"]}
    stored = json.loads((tmp_path / "matrix.json").read_text(encoding="utf-8"))
    assert set(stored) == {"schema", "generated", "summary", "cells"} and stored["generated"].endswith(
        "+00:00"
    )
    assert sorted(c["cell"] for c in stored["cells"]) == sorted(rows) and stored["summary"] == list(
        rows.values()
    )
    assert {n: r["where"] for n, r in rows.items()} == {
        "plain": "cpu", "bare": "cpu", "boxed": "cpu/docker", "card": "gpu", "named": "NVIDIA H200"
    }  # fmt: skip
    assert {n: r["log"] for n, r in rows.items()} == {
        "plain": "logs/plain.log", "bare": None, "boxed": "docker/logs/boxed.log", "card": "gpu/logs/card.log",
        "named": None,
    }  # fmt: skip
    plain, bare = rows["plain"], rows["bare"]
    assert (plain["torch"], plain["transformers"], plain["bench_ratio"]) == ("2.9.1", "4.57.3", 1.5)
    assert plain["stages"]["bench"] == "pass" and plain["stages"]["import"] == "-"
    assert (bare["torch"], bare["transformers"], bare["status"], bare["expected"]) == ("?", "?", "?", "pass")
    assert set(bare["stages"].values()) == {"-"} and bare["bench_ratio"] is None and not bare["as_expected"]


def test_headline_labels_non_cpu_cells_and_lists_each_kind() -> None:
    def row(cell, where="cpu", status="pass", as_expected=True, expected="pass"):
        return {
            "cell": cell,
            "where": where,
            "status": status,
            "as_expected": as_expected,
            "expected": expected,
        }

    rows = [row("a"), row("b", "gpu", "fail", expected="crash"), row("c", "cpu/docker", "fail", False),
            row("d", "gpu", "fail", expected="oom"), row("e", status="skipped"), row("f", "gpu", "skipped")]  # fmt: skip
    assert report.headline(rows) == (
        "3 of 4 cells behaved as expected (2 of them failing on purpose: b [gpu], d [gpu]); not as expected: "
        "c [cpu/docker] (fail (unexpected)); skipped here: e, f [gpu] (see Skipped)."
    )
