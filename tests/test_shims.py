"""Each runtime shim and the registry, function by function, on both sides of its fix: the shim's
`active` is replaced by one that names the fixes to take, so every version branch runs here in any
cell (the real branch of the installed stack is also run where it can be). Fast, no model: these are
the tests the compat mutation group runs per mutant (`scripts/mutation.py`)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import DynamicCache, LlamaConfig, LlamaModel

from dymu.compat import registry, shims
from dymu.errors import DymuError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _taking(monkeypatch, *names: str) -> None:
    """Make the shims take exactly the fixes `names` (a misspelt name in a shim then takes none)."""
    monkeypatch.setattr(shims, "active", lambda name: name in names)


def _kv(layers: int = 2, bsz: int = 2, heads: int = 1, n: int = 3, d: int = 4, offset: float = 0.0):
    keys = [torch.arange(bsz * heads * n * d, dtype=torch.float32).view(bsz, heads, n, d) + 100 * i + offset
            for i in range(layers)]  # fmt: skip
    return keys, [k + 0.5 for k in keys]


# ---------------------------------------------------------------- dtype-kwarg, image-tokens, keyword, bin


def test_dtype_kwargs_names_torch_dtype_only_under_the_fix(monkeypatch) -> None:
    _taking(monkeypatch, "dtype-kwarg")
    assert shims.dtype_kwargs(torch.float16) == {"torch_dtype": torch.float16}
    _taking(monkeypatch)
    assert shims.dtype_kwargs(torch.bfloat16) == {"dtype": torch.bfloat16}


def test_image_tokens_per_image_is_one_under_the_fix_else_every_patch(monkeypatch) -> None:
    _taking(monkeypatch, "image-tokens")
    assert shims.image_tokens_per_image(576) == 1
    _taking(monkeypatch)
    assert shims.image_tokens_per_image(576) == 576


def test_cache_keyword_and_bin_blocked_follow_their_fixes(monkeypatch) -> None:
    _taking(monkeypatch, "cache-keyword", "safetensors")
    assert (shims.cache_keyword(), shims.bin_blocked()) == ("cache", True)
    _taking(monkeypatch)
    assert (shims.cache_keyword(), shims.bin_blocked()) == ("past_key_values", False)


# ---------------------------------------------------------------- rope-parameters


def test_rope_theta_reads_rope_parameters_under_the_fix(monkeypatch) -> None:
    _taking(monkeypatch, "rope-parameters")
    theta = shims.rope_theta(SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 500000}))
    assert theta == 500000.0 and type(theta) is float
    assert shims.rope_theta(SimpleNamespace(rope_parameters={"rope_theta": 20.0})) == 20.0  # type defaults
    assert shims.rope_theta(SimpleNamespace(rope_parameters={"rope_type": None, "rope_theta": 30.0})) == 30.0
    assert shims.rope_theta(SimpleNamespace()) == 10000.0  # neither: Llama's default base
    assert shims.rope_theta(SimpleNamespace(rope_parameters=None)) == 10000.0
    # the old attributes are not read under the fix
    assert shims.rope_theta(SimpleNamespace(rope_theta=7.0, rope_scaling={"type": "linear"})) == 10000.0
    with pytest.raises(
        DymuError, match=r"^rope scaling type 'yarn' is not supported by dymu's VTU \(LLaVA-1\.5"
    ):
        shims.rope_theta(SimpleNamespace(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}))


def test_rope_theta_reads_the_config_attribute_before_the_fix(monkeypatch) -> None:
    _taking(monkeypatch)
    theta = shims.rope_theta(SimpleNamespace(rope_theta=10000))
    assert theta == 10000.0 and type(theta) is float
    assert shims.rope_theta(SimpleNamespace(rope_theta=7.0, rope_scaling=None)) == 7.0
    assert shims.rope_theta(SimpleNamespace(rope_theta=7.0, rope_scaling={"rope_type": "default"})) == 7.0
    assert shims.rope_theta(SimpleNamespace(rope_theta=7.0, rope_scaling={"type": None})) == 7.0
    # rope_type wins over the older `type` key
    assert (
        shims.rope_theta(SimpleNamespace(rope_theta=7.0, rope_scaling={"rope_type": "default", "type": "x"}))
        == 7.0
    )
    assert shims.rope_theta(SimpleNamespace(rope_theta=7.0, rope_parameters={"rope_theta": 3.0})) == 7.0
    for scaling in ({"type": "linear", "factor": 2.0}, {"rope_type": "dynamic"}):
        with pytest.raises(DymuError, match=r"rope scaling type '(linear|dynamic)' is not supported"):
            shims.rope_theta(SimpleNamespace(rope_theta=7.0, rope_scaling=scaling))


def test_rope_theta_of_this_stacks_llama_config() -> None:
    assert shims.rope_theta(LlamaConfig(rope_theta=20000.0)) == 20000.0


# ---------------------------------------------------------------- cache-format, cache-layers


def test_new_cache_is_tuples_only_for_a_model_without_cache_classes_under_the_fix(monkeypatch) -> None:
    keys, values = _kv()
    old_model = SimpleNamespace(_supports_cache_class=False)
    _taking(monkeypatch, "cache-format")
    tuples = shims.new_cache(old_model, keys, values)
    assert type(tuples) is tuple and len(tuples) == 2
    assert all(k is keys[i] and v is values[i] for i, (k, v) in enumerate(tuples))
    for model in (SimpleNamespace(), SimpleNamespace(_supports_cache_class=True)):
        assert isinstance(shims.new_cache(model, keys, values), DynamicCache)
    _taking(monkeypatch)
    cache = shims.new_cache(old_model, keys, values)
    assert isinstance(cache, DynamicCache)
    monkeypatch.setattr(shims, "active", registry.active)  # read it back as this stack does
    got_keys, got_values = shims.cache_tensors(cache)
    assert len(got_keys) == len(got_values) == 2
    assert all(torch.equal(g, w) for g, w in zip(got_keys + got_values, keys + values, strict=True))


def test_new_cache_refuses_keys_and_values_of_different_depths(monkeypatch) -> None:
    keys, values = _kv(layers=2)
    for taken in (("cache-format",), ()):
        _taking(monkeypatch, *taken)
        with pytest.raises(ValueError):
            shims.new_cache(SimpleNamespace(_supports_cache_class=False), keys, values[:1])


def test_cache_tensors_reads_tuples_layers_or_key_cache(monkeypatch) -> None:
    keys, values = _kv()
    pairs = list(zip(keys, values, strict=True))
    for taken in (("cache-layers",), ()):
        _taking(monkeypatch, *taken)
        for cache in (tuple(pairs), pairs):
            got = shims.cache_tensors(cache)
            assert type(got[0]) is list and all(
                a is b for a, b in zip(got[0] + got[1], keys + values, strict=True)
            )
    layered = SimpleNamespace(layers=[SimpleNamespace(keys=k, values=v) for k, v in pairs],
                              key_cache="gone", value_cache="gone")  # fmt: skip
    flat = SimpleNamespace(key_cache=tuple(keys), value_cache=tuple(values), layers="not yet")
    _taking(monkeypatch, "cache-layers")
    got = shims.cache_tensors(layered)
    assert all(a is b for a, b in zip(got[0] + got[1], keys + values, strict=True))
    _taking(monkeypatch)
    got = shims.cache_tensors(flat)
    assert type(got[0]) is list and type(got[1]) is list
    assert all(a is b for a, b in zip(got[0] + got[1], keys + values, strict=True))


def test_cache_length_is_the_first_layers_token_count() -> None:
    keys, values = _kv(n=5)
    length = shims.cache_length(tuple(zip(keys, values, strict=True)))
    assert length == 5 and type(length) is int
    assert shims.cache_length(shims.new_cache(SimpleNamespace(), keys, values)) == 5
    assert shims.cache_length(((keys[0], values[0]),)) == 5  # a one-layer decoder


def test_static_cache_of_a_one_layer_decoder(monkeypatch) -> None:
    monkeypatch.setattr(shims, "StaticCache", _RecordingStaticCache)
    keys, values = _kv(layers=1, bsz=3, n=4)
    for taken in (("static-cache",), ()):
        _taking(monkeypatch, *taken)
        cache = shims.static_cache(None, keys, values, max_len=8)
        assert cache.built["max_cache_len"] == 8 and cache.built.get("max_batch_size", 3) == 3
        ((k, v, layer, kwargs),) = cache.updates
        assert k is keys[0] and v is values[0] and layer == 0
        assert torch.equal(kwargs["cache_position"], torch.arange(4))


# ---------------------------------------------------------------- static-cache


class _RecordingStaticCache:
    """Stands in for transformers' StaticCache: records how it was built, reset and filled."""

    def __init__(self, **kwargs) -> None:
        self.built = kwargs
        self.resets = 0
        self.updates: list[tuple] = []

    def reset(self) -> None:
        self.resets += 1

    def update(self, k, v, layer, cache_kwargs) -> None:
        self.updates.append((k, v, layer, cache_kwargs))


def test_static_cache_supported_only_with_a_cache_class(monkeypatch) -> None:
    old_model = SimpleNamespace(_supports_cache_class=False)
    monkeypatch.setattr(shims, "StaticCache", _RecordingStaticCache)  # the class exists (>= 4.38)
    _taking(monkeypatch, "cache-format")
    assert (
        shims.static_cache_supported(old_model)
        == "this transformers has no StaticCache for this model (< 4.38)"
    )
    assert shims.static_cache_supported(SimpleNamespace()) is None
    _taking(monkeypatch)
    assert shims.static_cache_supported(old_model) is None
    monkeypatch.setattr(shims, "StaticCache", None)
    assert shims.static_cache_supported(SimpleNamespace()) == (
        "this transformers has no StaticCache for this model (< 4.38)"
    )


def test_static_cache_builds_with_the_fixs_constructor_and_fills_positions_from_zero(monkeypatch) -> None:
    monkeypatch.setattr(shims, "StaticCache", _RecordingStaticCache)
    keys, values = _kv(bsz=2, n=3)
    keys = [k.to(torch.float64) for k in keys]
    config = object()
    _taking(monkeypatch, "static-cache")
    cache = shims.static_cache(config, keys, values, max_len=9)
    assert cache.built == {"config": config, "max_batch_size": 2, "max_cache_len": 9,
                           "device": torch.device("cpu"), "dtype": torch.float64}  # fmt: skip
    assert [u[2] for u in cache.updates] == [0, 1]
    for (k, v, _, kwargs), key, value in zip(cache.updates, keys, values, strict=True):
        assert k is key and v is value
        assert set(kwargs) == {"cache_position"} and torch.equal(kwargs["cache_position"], torch.arange(3))
    _taking(monkeypatch)
    cache = shims.static_cache(config, keys, values, max_len=9, valid=torch.ones(2, 3, dtype=torch.bool))
    assert cache.built == {"config": config, "max_cache_len": 9}
    assert all(u[0] is key for u, key in zip(cache.updates, keys, strict=True))  # nothing padded: untouched
    with pytest.raises(ValueError):
        shims.static_cache(config, keys, values[:1], max_len=9)


def test_static_cache_gives_padded_positions_keys_of_one_and_reuses_a_cache(monkeypatch) -> None:
    monkeypatch.setattr(shims, "StaticCache", _RecordingStaticCache)
    _taking(monkeypatch)
    keys, values = _kv(bsz=2, n=3, offset=2.0)
    valid = torch.tensor([[0, 1, 1], [1, 1, 1]])
    old = _RecordingStaticCache(marker="built before")
    cache = shims.static_cache(object(), keys, values, max_len=5, valid=valid, reuse=old)
    assert cache is old and cache.resets == 1 and cache.built == {"marker": "built before"}
    for (k, v, _, _), key, value in zip(cache.updates, keys, values, strict=True):
        assert v is value
        assert torch.equal(k[0, :, 0], torch.ones_like(k[0, :, 0]))
        assert torch.equal(k[0, :, 1:], key[0, :, 1:]) and torch.equal(k[1], key[1])


def test_static_cache_of_this_stack_holds_the_keys_at_positions_from_zero() -> None:
    if shims.static_cache_supported(SimpleNamespace()) is not None:
        pytest.skip("no StaticCache in this transformers")
    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                         intermediate_size=16, vocab_size=10, head_dim=4)  # fmt: skip
    keys, values = _kv(bsz=2, heads=1, n=3, d=4)
    cache = shims.static_cache(config, keys, values, max_len=6)
    got_keys, got_values = shims.cache_tensors(cache)
    assert got_keys[1].shape == (2, 1, 6, 4)
    assert torch.equal(got_keys[1][:, :, :3], keys[1]) and torch.equal(got_values[0][:, :, :3], values[0])
    assert not got_keys[1][:, :, 3:].any()


# ---------------------------------------------------------------- causal-mask, mask-helper


def _expected_mask(attention_mask: torch.Tensor, q: int) -> torch.Tensor:
    kv = attention_mask.shape[1]
    rows = torch.arange(kv - q, kv)[:, None]
    return (torch.arange(kv)[None, :] <= rows)[None, None] & attention_mask.bool()[:, None, None]


LEFT_PADDED = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


def test_causal_mask_calls_create_causal_mask_by_its_own_keywords(monkeypatch) -> None:
    calls = []

    def new_style(config, inputs_embeds, attention_mask, cache, position_ids):
        calls.append({"config": config, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
                      "cache": cache, "position_ids": position_ids})  # fmt: skip
        return None

    def old_style(config, input_embeds, attention_mask, cache_position, past_key_values):
        calls.append({"config": config, "input_embeds": input_embeds, "attention_mask": attention_mask,
                      "cache_position": cache_position, "past_key_values": past_key_values})  # fmt: skip
        return None

    _taking(monkeypatch, "causal-mask")
    decoder = SimpleNamespace(config=object())
    embeds = torch.zeros(2, 2, 4)
    keys, values = _kv(bsz=2, n=3)
    past = tuple(zip(keys, values, strict=True))
    monkeypatch.setattr(shims, "create_causal_mask", new_style, raising=False)
    mask = shims.causal_mask(decoder, embeds, LEFT_PADDED, past)
    call = calls.pop()
    assert call["config"] is decoder.config and call["inputs_embeds"] is embeds and call["cache"] is past
    assert call["attention_mask"] is LEFT_PADDED
    assert torch.equal(call["position_ids"], torch.tensor([[1, 2], [3, 4]]))
    assert torch.equal(mask, _expected_mask(LEFT_PADDED, 2))  # None: built here, causal + padding
    monkeypatch.setattr(shims, "create_causal_mask", old_style, raising=False)
    mask = shims.causal_mask(decoder, embeds, LEFT_PADDED, past)
    call = calls.pop()
    assert call["input_embeds"] is embeds and call["past_key_values"] is past
    assert torch.equal(call["cache_position"], torch.tensor([3, 4]))
    assert torch.equal(mask, _expected_mask(LEFT_PADDED, 2))
    shims.causal_mask(decoder, torch.zeros(2, 5, 4), LEFT_PADDED)
    assert calls.pop()["past_key_values"] is None
    monkeypatch.setattr(shims, "create_causal_mask", new_style, raising=False)
    shims.causal_mask(decoder, torch.zeros(2, 5, 4), LEFT_PADDED)
    assert torch.equal(calls.pop()["position_ids"], torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]))


def test_causal_mask_uses_the_helper_or_update_causal_mask_before_the_fix(monkeypatch) -> None:
    calls = []
    embeds = torch.zeros(2, 2, 4)
    keys, values = _kv(bsz=2, n=3)
    past = tuple(zip(keys, values, strict=True))
    want = _expected_mask(LEFT_PADDED, 2)
    additive = torch.zeros(2, 1, 2, 5, dtype=torch.float16).masked_fill(~want, torch.finfo(torch.float16).min)

    def helper(*args):
        calls.append(args)
        return additive

    monkeypatch.setattr(shims, "_prepare_4d_causal_attention_mask", helper, raising=False)
    _taking(monkeypatch, "mask-helper")
    mask = shims.causal_mask(SimpleNamespace(), embeds, LEFT_PADDED, past)
    assert mask.dtype == torch.bool and torch.equal(mask, want)
    (args,) = calls
    assert args[0] is LEFT_PADDED and args[1] == (2, 2) and args[2] is embeds and args[3] == 3
    calls.clear()

    class Decoder:
        def _update_causal_mask(self, *args):
            calls.append(args)
            return additive[:1].to(torch.float32).masked_fill(~want[:1], torch.finfo(torch.float32).min)

    _taking(monkeypatch)
    mask = shims.causal_mask(Decoder(), embeds, LEFT_PADDED, past)
    assert mask.shape == (2, 1, 2, 5) and torch.equal(mask, want[:1].expand(2, 1, 2, 5))
    (args,) = calls
    assert args[0] is LEFT_PADDED and args[1] is embeds and args[3] is past and args[4] is False
    assert torch.equal(args[2], torch.tensor([3, 4]))


def test_causal_mask_densifies_a_block_mask(monkeypatch) -> None:
    want = _expected_mask(LEFT_PADDED, 5)
    monkeypatch.setattr(shims, "create_causal_mask", lambda **_: SimpleNamespace(to_dense=lambda: want),
                        raising=False)  # fmt: skip
    _taking(monkeypatch, "causal-mask")
    assert torch.equal(
        shims.causal_mask(SimpleNamespace(config=None), torch.zeros(2, 5, 4), LEFT_PADDED), want
    )


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_causal_mask_of_this_stacks_decoder_is_causal_and_masks_padding(attention: str) -> None:
    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=16,
                         vocab_size=10)  # fmt: skip
    config._attn_implementation = attention
    decoder = LlamaModel(config)
    mask = shims.causal_mask(decoder, torch.zeros(2, 5, 8), LEFT_PADDED)
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 5, 5)
    real = LEFT_PADDED.bool()  # rows of padding positions are each release's own business
    assert torch.equal(mask[:, 0][real], _expected_mask(LEFT_PADDED, 5)[:, 0][real])
    full = torch.ones(2, 5, dtype=torch.long)
    assert torch.equal(shims.causal_mask(decoder, torch.zeros(2, 5, 8), full), _expected_mask(full, 5))


# ---------------------------------------------------------------- weights-only


def test_safe_load_passes_the_callers_other_arguments_on(tmp_path) -> None:
    torch.save({"w": torch.arange(3.0)}, tmp_path / "plain.bin")
    assert torch.equal(
        shims.safe_load(tmp_path / "plain.bin")["w"], torch.arange(3.0)
    )  # no weights_only given
    seen = []

    def place(storage, location):
        seen.append(location)
        return storage

    assert torch.equal(shims.safe_load(tmp_path / "plain.bin", map_location=place)["w"], torch.arange(3.0))
    assert seen == ["cpu"]


# ---------------------------------------------------------------- registry


def _fix(**ranges: str) -> registry.Fix:
    return registry.Fix("x", "summary", {p: SpecifierSet(s) for p, s in ranges.items()}, "error", "never")


def test_fix_needed_says_which_range_holds_or_fails() -> None:
    fix = _fix(torch="", transformers=">=4.53")
    seed = {"torch": Version("2.9.1"), "transformers": Version("4.57.3")}
    assert fix.needed(seed) == (True, "torch 2.9.1 in any, transformers 4.57.3 in >=4.53")
    assert fix.needed({**seed, "transformers": Version("4.52.4")}) == (
        False,
        "transformers 4.52.4 outside >=4.53",
    )
    assert fix.needed({"transformers": Version("4.57.3")}) == (False, "torch not installed")
    assert _fix().needed({}) == (True, "")


def test_fix_needed_compares_release_numbers_so_pre_and_local_releases_count_as_their_release() -> None:
    fix = _fix(torch="<2.6")
    assert fix.needed({"torch": Version("2.6.0rc1")})[0] is False  # 2.6's candidate flipped the default too
    assert fix.needed({"torch": Version("2.5.1+cu124")})[0] is True
    assert _fix(transformers=">=5.0").needed({"transformers": Version("5.0.0rc2")})[0] is True


def test_fix_needed_reads_the_installed_versions_by_default(monkeypatch) -> None:
    asked = []
    here = {"torch": Version("2.5.1"), "transformers": Version("4.52.4"), "llava-torch": None}

    def installed(name):
        asked.append(name)
        return here[name]

    monkeypatch.setattr(registry, "installed", installed)
    assert _fix(torch="<2.6", transformers=">=4.52").needed() == (
        True,
        "torch 2.5.1 in <2.6, transformers 4.52.4 in >=4.52",
    )
    assert sorted(asked) == sorted(registry.PACKAGES) == ["llava-torch", "torch", "transformers"]
    assert _fix(**{"llava-torch": ""}).needed() == (False, "llava-torch not installed")


def test_fixes_are_the_patch_data_entries_field_by_field() -> None:
    data = tomllib.loads(registry.SOURCE_TREE_DATA.read_text(encoding="utf-8"))
    fixes = registry.fixes()
    assert list(fixes) == list(data)
    for name, entry in data.items():
        fix = fixes[name]
        assert (fix.name, fix.summary, fix.error, fix.remove_when) == (
            name, entry["summary"], entry["error"], entry["remove_when"]
        )  # fmt: skip
        assert fix.ranges == {p: SpecifierSet(entry[p]) for p in registry.PACKAGES if p in entry}
    assert fixes["safetensors"].ranges == {
        "torch": SpecifierSet("<2.6"),
        "transformers": SpecifierSet(">=4.52"),
    }


def test_the_patch_data_comes_from_the_package_where_there_is_no_source_tree(monkeypatch, tmp_path) -> None:
    (tmp_path / "fixes.toml").write_text("[only]\n", encoding="utf-8")
    asked = []

    def files(package):
        asked.append(package)
        return tmp_path

    monkeypatch.setattr(registry, "SOURCE_TREE_DATA", tmp_path / "absent" / "fixes.toml")
    monkeypatch.setattr(registry.resources, "files", files)
    assert registry._text() == "[only]\n" and asked == ["dymu.patchdata"]


@pytest.fixture
def nothing_disabled():
    registry.disable([])
    yield
    registry.disable([])


def test_disable_strips_names_skips_blanks_and_replaces_the_last_set(nothing_disabled) -> None:
    registry.disable(["scatter"])
    registry.disable([" causal-mask ", "", "  "])
    got = registry.disabled()
    assert got == {"causal-mask"} and type(got) is frozenset
    registry.disable([])
    assert registry.disabled() == frozenset()


def test_disable_names_every_unknown_fix_sorted(nothing_disabled) -> None:
    registry.disable(["scatter"])
    with pytest.raises(DymuError) as err:
        registry.disable(["zz-b", "scatter", "aa-a"])
    assert str(err.value) == f"unknown fixes ['aa-a', 'zz-b']; known: {', '.join(sorted(registry.fixes()))}"
    assert registry.disabled() == {"scatter"}  # a refused call changes nothing


def test_active_is_needed_and_not_disabled(nothing_disabled) -> None:
    assert registry.needed("scatter") and registry.active("scatter")  # needed on every stack
    registry.disable(["scatter"])
    assert not registry.active("scatter")
    registry.disable([])
    for name, fix in registry.fixes().items():
        if not registry.needed(name):
            assert not registry.active(name), fix.needed()
            registry.disable([name])
            assert not registry.active(name)
            registry.disable([])


def test_the_source_tree_file_is_the_checkouts_patches_file() -> None:
    assert Path(__file__).resolve().parents[1] / "patches" / "fixes.toml" == registry.SOURCE_TREE_DATA
