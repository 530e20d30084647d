"""Every fix in the patch set: its data parses, verify() holds, and where the installed
versions need it, the negative control reproduces the documented error."""

from __future__ import annotations

import pytest
import torch

import dymu
from dymu.compat import registry, shims
from dymu.compat.checks import CHECKS, check, check_all
from dymu.errors import DymuError

FIXES = sorted(registry.fixes())


def test_every_fix_in_the_patch_data_has_a_check_and_a_removal_note() -> None:
    assert set(FIXES) == set(CHECKS)
    assert {"scatter", "causal-mask", "safetensors", "cache-rename", "tokenizer"} <= set(FIXES)
    for fix in registry.fixes().values():
        assert fix.error and fix.remove_when and fix.summary


@pytest.mark.parametrize("name", FIXES)
def test_fix_holds_and_its_negative_control_fails_as_documented(name: str, record_property) -> None:
    result = check(registry.fixes()[name])
    record_property("compat", result)
    print(result)
    if result["verify"] == "n.a.":
        assert result["detail"].startswith("needs "), result
        return
    assert result["verify"] == "held", result
    if result["needed"] == "yes" and CHECKS[name].negative is not None:
        assert result["negative"] == "failed as documented", result


def test_check_all_reports_every_fix_in_the_data_order() -> None:
    assert [r["fix"] for r in check_all(negative=False)] == list(registry.fixes())


def test_an_unknown_fix_cannot_be_disabled() -> None:
    with pytest.raises(DymuError, match=r"unknown fixes \['causal-msk'\]"):
        registry.disable(["causal-msk"])


@pytest.fixture
def no_fixes_disabled():
    yield
    registry.disable([])


def test_disabling_the_causal_mask_fix_brings_back_its_documented_error(
    no_fixes_disabled, tiny_checkpoints, images, calibrated
) -> None:
    """The broken cell's switch: a padded DyMU prefill takes the 4.41-4.52 path, as unfixed
    DyMU-style code does, and must die with the documented error wherever that API is gone."""
    model = dymu.load(tiny_checkpoints["llava-hf-tiny-safetensors"], thresholds=calibrated)
    prompts = [dymu.format_prompt("What is in the picture?"), dymu.format_prompt("Describe it, please.")]
    fine = model.prepare(prompts, images[:2])
    assert not bool(fine.attention_mask.all()), "the batch must be padded to reach the mask"
    registry.disable(["causal-mask", "scatter"])
    assert registry.disabled() == {"causal-mask", "scatter"} and not registry.active("causal-mask")
    fix = registry.fixes()["causal-mask"]
    assert check(fix, negative=False)["disabled"]
    if not registry.needed("causal-mask"):  # before 4.53 the unfixed path is the right one: nothing changes
        again = model.prepare(prompts, images[:2])
        assert again.visual_tokens == fine.visual_tokens and torch.equal(again.virtual_ids, fine.virtual_ids)
        return
    with pytest.raises(AttributeError, match=fix.error):
        model.prepare(prompts, images[:2])
    with pytest.raises(AttributeError, match=fix.error):
        CHECKS["causal-mask"].verify()


def test_shims_follow_the_registered_ranges() -> None:
    """Each shim takes the path its fix's range selects: the code holds no version number."""
    assert shims.cache_keyword() == ("cache" if registry.needed("cache-keyword") else "past_key_values")
    assert shims.image_tokens_per_image(576) == (1 if registry.needed("image-tokens") else 576)
    assert set(shims.dtype_kwargs(None)) == ({"torch_dtype"} if registry.needed("dtype-kwarg") else {"dtype"})
    assert shims.bin_blocked() == registry.needed("safetensors")
