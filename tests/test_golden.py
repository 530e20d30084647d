"""Golden outputs: this cell reproduces the reference cell, and planted silent bugs are caught."""

from __future__ import annotations

import copy

import pytest
import torch
from legacy_family import skip_without_legacy

from dymu.compat.shims import bin_blocked
from dymu.errors import DymuError
from dymu.matrix.golden import CASES, case_family, compare, expected, load_golden, run_case

GOLDEN = load_golden()
ATOL = GOLDEN["tolerance"]["top_logits_atol"]
TAU = torch.tensor(GOLDEN["thresholds"])
TASK_TAU = torch.tensor(GOLDEN["task_thresholds"])


@pytest.mark.parametrize("case", CASES)
def test_cell_reproduces_the_reference_cell(case: str) -> None:
    skip_without_legacy(case_family(case))
    if case.endswith("-bin") and bin_blocked():
        with pytest.raises(DymuError, match=r"only \.bin weights"):
            run_case(case, TAU)
        return
    assert compare(run_case(case, TAU, task_tau=TASK_TAU), expected(GOLDEN, case), ATOL) == []


@pytest.mark.parametrize(("drift", "caught"), [(1e-3, True), (-1e-3, True), (1e-6, False), (0.0, False)])
def test_the_stored_tolerance_flags_a_1e3_logit_drift(drift: float, caught: bool) -> None:
    """A silent float bug (an unweighted merge mean moves the top logits by ~0.03 with the same
    ids) shows only in `top_logits`: the stored tolerance must flag a 1e-3 drift of one logit either
    way, and let float noise (1e-6; 3.8e-6 is the largest seen across the CPU cells) through."""
    for case in (CASES[0], CASES[2]):
        want = GOLDEN["cases"][case]
        got = copy.deepcopy(want)
        got["top_logits"][-1][2] += drift
        problems = compare(got, want, ATOL)
        assert bool(problems) is caught, (case, drift, problems)
        if caught:
            assert problems == [f"top_logits off by {abs(drift):.3g} > atol {ATOL:g}"]


def test_golden_catches_a_dropped_mapping(monkeypatch) -> None:
    """Plant: VTU groups image positions in merged order instead of by the tower's mapping."""
    from dymu import vtu

    original = vtu.Remerger.__init__

    def unmapped(self, idx, n_u, dtype, deterministic=False, packed=False, **kwargs):
        original(self, torch.sort(idx, dim=1).values, n_u, dtype, deterministic, packed, **kwargs)

    monkeypatch.setattr(vtu.Remerger, "__init__", unmapped)
    problems = compare(run_case(CASES[0], TAU), GOLDEN["cases"][CASES[0]], ATOL)
    assert any("top_logits" in p or "greedy_ids" in p for p in problems), problems


def test_golden_catches_a_swallowed_cache(monkeypatch) -> None:
    """Plant: the prefilled cache never reaches generate (an empty cache object goes instead)."""
    from dymu import generation

    real_new_cache = generation.new_cache

    def empty_cache(model, keys, values):
        return real_new_cache(model, [k[..., :0, :] for k in keys], [v[..., :0, :] for v in values])

    monkeypatch.setattr(generation, "new_cache", empty_cache)
    try:
        problems = compare(run_case(CASES[0], TAU), GOLDEN["cases"][CASES[0]], ATOL)
    except Exception as err:  # any error is a detection too: the runner records the case as failed
        problems = [f"raised {type(err).__name__}"]
    assert problems


def test_golden_catches_a_lost_bos_where_the_fix_is_needed_and_only_there() -> None:
    """The tokenizer_config.json-without-add_bos_token variant reproduces the recorded outputs only
    with the bos-default fix; switched off where it is needed, the comparison must fail."""
    from dymu.compat import registry
    from dymu.testing.tiny import NOBOS

    skip_without_legacy(case_family(NOBOS))
    registry.disable(["bos-default"])
    try:
        problems = compare(run_case(NOBOS, TAU), expected(GOLDEN, NOBOS), ATOL)
    finally:
        registry.disable([])
    if registry.needed("bos-default"):
        assert "prompt_ids differ" in problems
    else:  # before 5.0 the tokenizer adds BOS by itself: switching the fix off changes nothing
        assert problems == []


def test_an_accuracy_change_on_the_shapes_task_is_reported_as_a_number() -> None:
    """A stack that answers one test question differently fails the comparison with both
    accuracies in the message, not only as changed ids."""
    want = GOLDEN["cases"][CASES[0]]
    assert {"stock", "dymu"} <= set(want["task"])
    got = copy.deepcopy(want)
    task = got["task"]["dymu"]
    task["answer_ids"][0] = [2]  # an empty answer: wrong
    task["accuracy"] = round(task["accuracy"] - 1 / len(task["answer_ids"]), 6)
    problems = compare(got, want, ATOL)
    assert (
        f"task accuracy (dymu) {task['accuracy']:.3f}, golden {want['task']['dymu']['accuracy']:.3f}"
        in problems
    )
    assert "task answers (dymu) differ" in problems
    assert not any("stock" in p for p in problems)
