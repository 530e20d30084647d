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
