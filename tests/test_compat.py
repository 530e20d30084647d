"""Every fix in the patch set: its data parses, verify() holds, and where the installed
versions need it, disabling it reproduces the documented error (negative control)."""

from __future__ import annotations

import pytest

from dymu.compat import all_fixes, check, patch_set

FIXES = sorted(all_fixes())


def test_patch_data_names_only_registered_fixes() -> None:
    expected = {"scatter", "weights-only", "safetensors", "cache-format", "generate-kwargs", "cache-rename",
                "causal-mask", "loader-kwargs", "tokenizer", "legacy-import"}  # fmt: skip
    assert set(FIXES) == expected
    for fix in all_fixes().values():
        assert fix.error and fix.remove_when and fix.summary


@pytest.mark.parametrize("name", FIXES)
def test_fix_holds_and_its_negative_control_fails_as_documented(name: str, record_property) -> None:
    result = check(all_fixes()[name])
    record_property("compat", result)
    print(result)
    if result["verify"] == "n.a.":
        assert result["detail"].startswith("needs "), result
        return
    assert result["verify"] == "held", result
    if result["needed"] == "yes" and all_fixes()[name].negative is not None:
        assert result["negative"] == "failed as documented", result


def test_patch_set_is_the_needed_fixes() -> None:
    assert {f.name for f in patch_set()} == {n for n, f in all_fixes().items() if f.needed()[0]}
    assert "scatter" in {f.name for f in patch_set()}


def test_disabling_the_causal_mask_fix_brings_back_its_documented_error(
    monkeypatch, tiny_checkpoints, images, calibrated
) -> None:
    """DYMU_DISABLE_FIXES=causal-mask makes a padded DyMU prefill call the 4.41-4.52 API, as
    unfixed DyMU-style code does: it must die with the documented error wherever that API is gone."""
    import dymu
    from dymu.compat import disabled
    from dymu.versions import transformers_at_least

    model = dymu.load(tiny_checkpoints["llava-hf-tiny-safetensors"], thresholds=calibrated)
    prompts = [dymu.format_prompt("What is in the picture?"), dymu.format_prompt("Describe it, please.")]
    fine = model.prepare(prompts, images[:2])
    assert not bool(fine.attention_mask.all()), "the batch must be padded to reach the mask"
    monkeypatch.setenv("DYMU_DISABLE_FIXES", "causal-mask, scatter")
    assert disabled() == {"causal-mask", "scatter"} and disabled("causal-mask")
    assert check(all_fixes()["causal-mask"], negative=False)["disabled"]
    if transformers_at_least("4.41") and not transformers_at_least("4.53"):  # the old API still exists here
        assert model.prepare(prompts, images[:2]).visual_tokens == fine.visual_tokens
        return
    with pytest.raises(AttributeError, match=all_fixes()["causal-mask"].error):
        model.prepare(prompts, images[:2])
    with pytest.raises(AttributeError, match=all_fixes()["causal-mask"].error):
        all_fixes()["causal-mask"].verify()
