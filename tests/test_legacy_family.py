"""DyMU on the legacy `llava` package (liuhaotian layout) through its own load_pretrained_model."""

from __future__ import annotations

import pytest
import torch

import dymu
from dymu.generation import cache_length, generate_prepared, prepare
from dymu.versions import installed

pytestmark = pytest.mark.skipif(
    installed("llava-torch") is None, reason="llava-torch not installed (nox cells install it --no-deps)"
)
QUESTIONS = ["What is this?", "Describe the picture in detail, please.", "Colours?"]
NEW_TOKENS = 6


def _stock_one(model: dymu.DymuLlava, prompt: str, image):
    """The legacy package's own path: its generate() with images=..."""
    ids = torch.tensor([model.tokenize(prompt)])
    with torch.no_grad():
        out = model.model.generate(
            ids, images=model.pixel_values([image]), max_new_tokens=NEW_TOKENS, do_sample=False,
            return_dict_in_generate=True, output_scores=True, pad_token_id=0,
        )  # fmt: skip
    return out.sequences[0, -NEW_TOKENS:], out.scores[0][0]


@pytest.mark.parametrize("serialization", ["safetensors", "bin"])
def test_t2_no_merges_equals_the_legacy_package(
    tiny_checkpoints, images, serialization, load_unmerged
) -> None:
    model = load_unmerged(tiny_checkpoints[f"llava-v1.5-tiny-{serialization}"], serialization)
    if model is None:  # .bin refused on this stack, as documented
        return
    assert model.family == "legacy" and type(model.model).__name__ == "LlavaLlamaForCausalLM"
    prompts = [dymu.format_prompt(q) for q in QUESTIONS]
    batch = model.prepare(prompts, images[:3])
    out = generate_prepared(model.parts, batch, NEW_TOKENS)
    for i, prompt in enumerate(prompts):
        tokens, first_logits = _stock_one(model, prompt, images[i])
        torch.testing.assert_close(out.scores[0][i], first_logits, rtol=1e-4, atol=1e-4)
        assert out.sequences[i, -NEW_TOKENS:].tolist() == tokens.tolist()


def test_t3_and_batching_with_merges(tiny_checkpoints, images, calibrated) -> None:
    model = dymu.load(tiny_checkpoints["llava-v1.5-tiny-safetensors"], thresholds=calibrated)
    prompts = [dymu.format_prompt(q) for q in QUESTIONS]
    picks = [images[0], images[1], images[5]]
    ids = model.tokenize(prompts[0])
    batch = prepare(model.parts, [ids], model.pixel_values(picks[:1]), model.thresholds)
    assert cache_length(batch.cache) + 1 == len(ids) - 1 + 64
    batched = model.generate(prompts, picks, max_new_tokens=NEW_TOKENS)
    assert len({a.visual_tokens for a in batched}) > 1
    for prompt, image, answer in zip(prompts, picks, batched, strict=True):
        assert model.generate(prompt, image, max_new_tokens=NEW_TOKENS)[0].token_ids == answer.token_ids
