"""DyMU on both checkpoint families (llava-hf through `LlavaForConditionalGeneration`, liuhaotian
through the legacy package's own builder), one suite parametrised over the family and the
serialization: T2 (no merges == the family's own stock generate), T3 (cache length),
batching, VTU "none", and the fidelity figure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dymu
from dymu import families, generation
from dymu.compat.shims import cache_length, cache_tensors, static_cache_supported
from dymu.generation import decode_path, generate_prepared, prepare, stock_prepare
from dymu.options import Options
from dymu.versions import installed

QUESTIONS = ["What is this?", "Describe the picture in detail, please.", "Colours?"]
NEW_TOKENS = 6
DIRS = {"hf": "llava-hf-tiny-{}", "legacy": "llava-v1.5-tiny-{}"}
FAMILY = [
    pytest.param("hf", id="hf"),
    pytest.param("legacy", id="legacy", marks=pytest.mark.skipif(
        installed("llava-torch") is None, reason="llava-torch not installed (nox cells install it --no-deps)")),
]  # fmt: skip


def _path(tiny_checkpoints, family: str, serialization: str = "safetensors"):
    return tiny_checkpoints[DIRS[family].format(serialization)]


@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("serialization", ["safetensors", "bin"])
def test_t2_no_merges_equals_the_familys_stock_generate(
    tiny_checkpoints, images, family, serialization, load_unmerged
) -> None:
    model = load_unmerged(_path(tiny_checkpoints, family, serialization), serialization)
    if model is None:  # .bin refused on this stack, as documented
        return
    assert model.family == family
    prompts = [dymu.format_prompt(q) for q in QUESTIONS]
    batch = model.prepare(prompts, images[:3])
    out = generate_prepared(model.parts, batch, NEW_TOKENS)
    ids = [model.tokenize(p) for p in prompts]
    stock = model.family_impl.stock_generate(model.parts, ids, model.pixel_values(images[:3]), NEW_TOKENS)
    assert batch.visual_tokens == [64, 64, 64]
    torch.testing.assert_close(out.scores[0], stock.first_scores, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.sequences[:, batch.virtual_ids.shape[1] :], stock.new_tokens)


@pytest.mark.parametrize("family", FAMILY)
def test_t3_cache_holds_text_plus_576_equivalent(tiny_checkpoints, images, calibrated, family) -> None:
    model = dymu.load(_path(tiny_checkpoints, family), thresholds=calibrated)
    ids = model.tokenize(dymu.format_prompt(QUESTIONS[0]))
    n_text = len(ids) - 1
    batch = prepare(model.parts, [ids], model.pixel_values(images[:1]), model.thresholds)
    assert batch.visual_tokens[0] < 64, "calibrated thresholds should merge"
    assert cache_length(batch.cache) + 1 == n_text + 64  # the last prompt token is run by generate
    out = generate_prepared(model.parts, batch, NEW_TOKENS)
    assert out.sequences.shape[1] == n_text + 64 + NEW_TOKENS
    assert cache_length(out.past_key_values) == n_text + 64 + NEW_TOKENS - 1


@pytest.mark.parametrize("family", FAMILY)
def test_unmerged_prepare_fills_the_stock_prefills_cache(tiny_checkpoints, images, family) -> None:
    """With merging off, DyMU's prefill (fast VTU) leaves the cache the stock prefill leaves: the
    same length (every prompt position but the last, which generate runs) and the same keys and
    values at every real position of a left-padded batch. A cache one position short, or shifted,
    fails here without decoding anything."""
    model = dymu.load(_path(tiny_checkpoints, family), thresholds=torch.full((4,), float("inf")))
    ids = [model.tokenize(dymu.format_prompt(q)) for q in QUESTIONS]
    pixels = model.pixel_values(images[:3])
    ours, stock = prepare(model.parts, ids, pixels, model.thresholds), stock_prepare(model.parts, ids, pixels)
    assert torch.equal(ours.virtual_ids, stock.virtual_ids)
    assert torch.equal(ours.attention_mask, stock.attention_mask)
    real = ours.attention_mask[:, :-1].bool()
    assert not bool(real.all()), "the prompts must differ in length so the batch is padded"
    n = ours.virtual_ids.shape[1] - 1
    (keys, values), (stock_keys, stock_values) = cache_tensors(ours.cache), cache_tensors(stock.cache)
    assert len(keys) == len(stock_keys) == model.parts.decoder.config.num_hidden_layers
    for got, want in zip(keys + values, stock_keys + stock_values, strict=True):
        assert got.shape == want.shape and got.shape[-2] == n
        for b in range(len(ids)):
            torch.testing.assert_close(got[b][:, real[b]], want[b][:, real[b]], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY)
def test_batched_generation_equals_one_at_a_time(tiny_checkpoints, images, calibrated, family) -> None:
    model = dymu.load(_path(tiny_checkpoints, family), thresholds=calibrated)
    prompts = [dymu.format_prompt(q) for q in QUESTIONS]
    picks = [images[0], images[1], images[5]]
    batched = model.generate(prompts, picks, max_new_tokens=NEW_TOKENS)
    counts = [a.visual_tokens for a in batched]
    assert len(set(counts)) > 1, f"test images should give different token counts, got {counts}"
    for prompt, image, answer in zip(prompts, picks, batched, strict=True):
        single = model.generate(prompt, image, max_new_tokens=NEW_TOKENS)[0]
        assert single.token_ids == answer.token_ids
        assert single.visual_tokens == answer.visual_tokens


@pytest.mark.parametrize("family", FAMILY)
def test_static_decode_gives_the_dynamic_decodes_greedy_tokens(
    tiny_checkpoints, images, calibrated, family
) -> None:

    model = dymu.load(_path(tiny_checkpoints, family), thresholds=calibrated)
    if static_cache_supported(model.model):
        with pytest.raises(dymu.DymuError, match="decode='static'"):
            decode_path(model.parts, Options(decode="static"))
        return
    assert decode_path(model.parts, Options())[0] == "dynamic", "auto stays dynamic on the CPU"
    prompts = [dymu.format_prompt(q) for q in QUESTIONS]
    ids = [model.tokenize(p) for p in prompts]
    pixels = model.pixel_values([images[0], images[1], images[5]])
    for prepare_batch in (lambda: model.prepare(prompts, [images[0], images[1], images[5]]),
                          lambda: stock_prepare(model.parts, ids, pixels)):  # fmt: skip
        dynamic = generate_prepared(model.parts, prepare_batch(), NEW_TOKENS, Options(decode="dynamic"))
        static = generate_prepared(model.parts, prepare_batch(), NEW_TOKENS, Options(decode="static"))
        assert torch.equal(static.sequences, dynamic.sequences)
        torch.testing.assert_close(static.scores[0], dynamic.scores[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILY)
def test_vtu_none_feeds_only_merged_tokens(tiny_checkpoints, images, calibrated, family) -> None:
    model = dymu.load(_path(tiny_checkpoints, family), thresholds=calibrated, vtu="none")
    ids = model.tokenize(dymu.format_prompt(QUESTIONS[0]))
    batch = prepare(model.parts, [ids], model.pixel_values(images[:1]), model.thresholds, vtu="none")
    assert cache_length(batch.cache) + 1 == len(ids) - 1 + batch.visual_tokens[0]
    assert (
        len(model.generate(dymu.format_prompt(QUESTIONS[0]), images[0], max_new_tokens=4)[0].token_ids) == 4
    )


@pytest.mark.parametrize("family", FAMILY)
def test_a_prompt_needs_exactly_one_image(tiny_checkpoints, family) -> None:
    model = dymu.load(_path(tiny_checkpoints, family))
    with pytest.raises(dymu.DymuError, match="exactly one <image>"):
        model.tokenize("USER: <image> and <image> ASSISTANT:")


def test_the_family_is_decided_once_from_the_config(tiny_checkpoints) -> None:

    assert families.detect(tiny_checkpoints["llava-hf-tiny-safetensors"]).name == "hf"
    assert families.detect(tiny_checkpoints["llava-v1.5-tiny-bin"]).name == "legacy"
    with pytest.raises(dymu.DymuError, match="unsupported model_type 'clip_vision_model'"):
        families.detect(tiny_checkpoints["clip"])


def test_fidelity_figure_for_finite_thresholds(tiny_checkpoints, images, calibrated, record_property) -> None:
    """T5: reported, not asserted equal. DyMU-fast vs stock on 8 images (llava-hf)."""
    model = dymu.load(_path(tiny_checkpoints, "hf"), thresholds=calibrated)
    prompts = [dymu.format_prompt(QUESTIONS[0])] * len(images)
    ids = [model.tokenize(p) for p in prompts]
    stock = model.family_impl.stock_generate(model.parts, ids, model.pixel_values(images), NEW_TOKENS)
    batch = model.prepare(prompts, images)
    out = generate_prepared(model.parts, batch, NEW_TOKENS)
    first_cos = torch.nn.functional.cosine_similarity(out.scores[0], stock.first_scores, dim=-1)
    agreement = (out.sequences[:, batch.virtual_ids.shape[1] :] == stock.new_tokens).float().mean().item()
    mean_tokens = sum(batch.visual_tokens) / len(batch.visual_tokens)
    record_property("first_token_logit_cosine", first_cos.mean().item())
    record_property("greedy_token_agreement", agreement)
    print(f"fidelity (tiny random model, {mean_tokens:.1f}/64 visual tokens): first-token logit cosine "
          f"{first_cos.mean():.4f} (min {first_cos.min():.4f}), greedy agreement {agreement:.2%}")  # fmt: skip
    assert mean_tokens < 64 and torch.isfinite(first_cos).all()
    assert -1.0 <= first_cos.min() <= 1.0 + 1e-6


@pytest.mark.parametrize("conv_mode", ["llava_v1", "vicuna_v1"])
def test_conversation_templates_match_the_legacy_packages_own(conv_mode) -> None:
    text = dymu.format_prompt("What is shown?", conv_mode)
    assert text.endswith(" USER: <image>\nWhat is shown? ASSISTANT:")
    with pytest.raises(dymu.DymuError, match="conv_mode='llava_v2'"):
        dymu.format_prompt("x", "llava_v2")
    if installed("llava-torch") is None:
        pytest.skip("llava-torch not installed: its conv_templates cannot be compared")
    from llava.conversation import conv_templates

    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat is shown?")
    conv.append_message(conv.roles[1], None)
    assert text == conv.get_prompt()


def test_legacy_family_tests_pass_in_a_fresh_process() -> None:
    """The legacy-family tests again in a new interpreter, so whatever earlier tests applied or
    loaded in this one cannot stand in for a fix this stack's patch set lacks (test order then
    cannot hide a narrowed range: the legacy generate fails with its documented TypeError)."""
    if installed("llava-torch") is None:
        pytest.skip("llava-torch not installed (nox cells install it --no-deps)")
    argv = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
            "-k", "legacy and not fresh_process"]  # fmt: skip
    done = subprocess.run(argv, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.parametrize("family", FAMILY)
def test_the_static_cache_is_reused_and_refilled_across_calls(
    tiny_checkpoints, images, calibrated, family
) -> None:
    """Consecutive static decodes of different prompts (lengths in one bucket) reuse one cache, reset
    and refilled: each gives the dynamic decode's tokens, so nothing of the previous call leaks."""

    model = dymu.load(_path(tiny_checkpoints, family), thresholds=calibrated)
    if static_cache_supported(model.model):
        pytest.skip("this transformers has no StaticCache (the static-cache tests above cover the refusal)")
    held = []
    for question, image in ((QUESTIONS[0], images[0]), (QUESTIONS[1], images[3]), (QUESTIONS[0], images[5])):
        prompt = dymu.format_prompt(question)
        dynamic = generate_prepared(model.parts, model.prepare([prompt], [image]), NEW_TOKENS,
                                    Options(decode="dynamic"))  # fmt: skip
        static = generate_prepared(model.parts, model.prepare([prompt], [image]), NEW_TOKENS,
                                   Options(decode="static"))  # fmt: skip
        assert torch.equal(static.sequences, dynamic.sequences)
        held.append(generation._static_caches[model.model][1])
    assert held[0] is held[1] is held[2]
