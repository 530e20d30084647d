"""Every fix in the patch set: its data parses, verify() holds, and where the installed
versions need it, the negative control reproduces the documented error."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from packaging.version import Version

import dymu
from dymu.compat import legacy, registry, shims
from dymu.compat.checks import CHECKS, check, check_all
from dymu.errors import DymuError
from dymu.matrix import cells
from dymu.versions import installed

FIXES = sorted(registry.fixes())

# The fixes each core cell needs, derived by hand from patches/fixes.toml's ranges and the cell's
# pins in envs/cells.toml (every core cell installs llava-torch). Written out rather than computed,
# so a changed range or pin must change this table too, where a reviewer sees it.
ALWAYS = {"scatter", "legacy-import", "builder-dtype"}
NEEDED_BY_CELL: dict[str, set[str]] = {
    "reference": ALWAYS | {"weights-only", "cache-format", "dtype-kwarg", "image-tokens", "mask-helper"},
    "window": ALWAYS | {"weights-only", "generate-kwargs", "dtype-kwarg", "static-cache"},
    "bin-guard": ALWAYS | {"weights-only", "safetensors", "generate-kwargs", "dtype-kwarg", "static-cache"},
    "mask": ALWAYS | {"generate-kwargs", "causal-mask", "dtype-kwarg", "static-cache"},
    "seed": ALWAYS | {"generate-kwargs", "causal-mask", "cache-layers"},
    "user-env": ALWAYS | {"generate-kwargs", "causal-mask", "cache-layers"},  # the seed stack, exact pins
    "py312": ALWAYS | {"generate-kwargs", "causal-mask", "cache-layers"},  # the seed stack on Python 3.12
    "v5": ALWAYS | {"generate-kwargs", "causal-mask", "cache-layers", "loader-kwargs", "tokenizer",
                    "rope-parameters", "bos-default"},
    "latest": ALWAYS | {"cache-rename", "causal-mask", "cache-layers", "loader-kwargs", "rope-parameters",
                        "cache-keyword", "bos-default"},
}  # fmt: skip


def _cell_versions(cell: dict) -> dict[str, Version | None]:
    legacy = [spec.split("==")[1] for spec in cell.get("legacy", []) if spec.startswith("llava-torch==")]
    return {"torch": Version(cell["torch"]), "transformers": Version(cell["transformers"]),
            "llava-torch": Version(legacy[0]) if legacy else None}  # fmt: skip


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
    with pytest.raises(DymuError, match=r"unknown fixes \['causal-msk'\]") as err:
        registry.disable(["causal-msk"])
    assert str(err.value).endswith("known: " + ", ".join(sorted(registry.fixes())))


def test_the_patch_data_is_read_from_the_source_tree_file() -> None:
    """Running from a checkout, an edit of patches/fixes.toml counts at once."""
    assert registry._text() == registry.SOURCE_TREE_DATA.read_text(encoding="utf-8")


def test_safe_load_ignores_a_callers_weights_only_false(tmp_path) -> None:
    """A caller (the legacy builder) asking for weights_only=False still gets the weights-only
    unpickler: the payload is refused and never runs."""
    marker = tmp_path / "ran"
    torch.save({"w": torch.ones(2), "evil": _Touch(marker)}, tmp_path / "evil.bin")
    with pytest.raises(pickle.UnpicklingError):
        shims.safe_load(tmp_path / "evil.bin", map_location="cpu", weights_only=False)
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.bin")
    assert torch.equal(shims.safe_load(tmp_path / "plain.bin", weights_only=False)["w"], torch.ones(2))


class _Touch:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


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


def test_each_core_cell_needs_exactly_the_hand_derived_fixes() -> None:
    """The ranges in patches/fixes.toml, evaluated at each core cell's pins, give the table above:
    narrowing a range (e.g. generate-kwargs `<5.4` -> `<4.57`) changes a cell's set and fails."""
    data = cells.load()
    assert set(NEEDED_BY_CELL) == set(data["sets"]["core"])
    for name, want in NEEDED_BY_CELL.items():
        versions = _cell_versions(data["cells"][name])
        assert versions["llava-torch"] is not None, f"{name}: the table assumes the legacy package"
        got = {fix.name for fix in registry.fixes().values() if fix.needed(versions)[0]}
        assert got == want, (name, sorted(got ^ want))


def test_the_installed_stack_needs_its_cells_fixes() -> None:
    """Where the installed torch + transformers are a core cell's pins, the runtime's `needed()`
    gives that cell's hand-derived set (minus the legacy fixes where llava-torch is absent)."""
    data = cells.load()
    here = (installed("torch").base_version, installed("transformers").base_version)
    matches = [
        n for n in NEEDED_BY_CELL if (data["cells"][n]["torch"], data["cells"][n]["transformers"]) == here
    ]
    if not matches:
        pytest.skip(f"torch {here[0]} + transformers {here[1]} is not a core cell")
    want = NEEDED_BY_CELL[matches[0]]
    if installed("llava-torch") is None:
        want = {n for n in want if "llava-torch" not in registry.fixes()[n].ranges}
    assert {n for n in registry.fixes() if registry.needed(n)} == want


FRESH_CHECKS = textwrap.dedent(
    """
    from dymu.compat import legacy
    from dymu.compat.checks import check_all
    before = legacy.patch_state()
    assert before, "no patchable attributes found"
    results = check_all(negative=True)
    after = legacy.patch_state()
    changed = sorted(k for k in before if before[k] is not after[k])
    assert not changed, f"checks left these patched: {changed}"
    print("unchanged", len(results))
    """
)


def test_checks_leave_the_patched_attributes_as_they_found_them() -> None:
    """In a fresh process (no earlier load has patched anything), running every check, negative
    controls included, leaves the legacy class and builder as they were: a fix applied for a check
    cannot carry a later test in the same process."""
    if installed("llava-torch") is None:
        pytest.skip("llava-torch not installed: nothing is patched")
    done = subprocess.run([sys.executable, "-c", FRESH_CHECKS], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "unchanged" in done.stdout, done.stderr[-3000:]


def test_patches_restored_undoes_what_the_patch_set_applied() -> None:
    """The context manager restores replaced attributes and deletes ones it added."""
    if installed("llava-torch") is None:
        pytest.skip("llava-torch not installed: nothing is patched")
    cls = legacy.legacy_class()
    before = legacy.patch_state()
    with legacy.patches_restored():
        cls.forward = lambda self: None
        cls._dymu_loader = "planted"
        legacy.apply_patch_set()
    after = legacy.patch_state()
    assert all(after[k] is before[k] for k in before), sorted(k for k in before if after[k] is not before[k])


def test_missing_legacy_dependencies_are_named_all_at_once_with_one_command(monkeypatch) -> None:
    """Every missing package in one line with one install command (llava-torch with --no-deps), not
    one error per run."""

    monkeypatch.setattr(legacy, "NEEDS", (("json", "json-is-here"), ("dymu_no_such_a", "pkg-a"),
                                          ("dymu_no_such_b", "pkg-b")))  # fmt: skip
    monkeypatch.setattr(legacy, "installed", lambda name: None)
    assert legacy.missing_dependencies() == ["pkg-a", "pkg-b", "llava-torch"]
    with pytest.raises(DymuError) as err:
        legacy.import_legacy()
    message = str(err.value)
    assert (
        "needs pkg-a, pkg-b, llava-torch: pip install pkg-a pkg-b && pip install --no-deps llava-torch"
        in message
    )
    assert "\n" not in message and "json-is-here" not in message
    assert legacy.install_command(["llava-torch"]).startswith("pip install --no-deps llava-torch==")
