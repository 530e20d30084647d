"""The full-size GPU stage's checks, exercised on the tiny model: DyMU with merging off must
match stock LLaVA, and planted plumbing bugs must fail the check at the bf16 tolerance the
GPU cells use (random weights make attention diffuse, so the check must still see them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dymu
import dymu.generation
import dymu.vtu
from dymu.matrix.full_size import IDENTITY_TOLERANCE, dymu_check, identity_check, stage_full_size

BF16_TOLERANCE = IDENTITY_TOLERANCE["bfloat16"]


@pytest.fixture(scope="module")
def tiny_inputs(tiny_checkpoints, images):
    model = dymu.load(tiny_checkpoints["llava-hf-tiny-safetensors"])
    prompts = [dymu.format_prompt(q) for q in ("What is in the picture?", "Is it busy?")]
    return model, [model.tokenize(p) for p in prompts], model.pixel_values(images[:2])


def test_identity_check_passes_on_a_correct_stack(tiny_inputs) -> None:
    model, ids, pixels = tiny_inputs
    result = identity_check(model.model, model.parts, ids, pixels)
    assert result["status"] == "pass", result["problems"]
    assert result["tolerance"] == IDENTITY_TOLERANCE["float32"]
    assert result["cache_relative_error"] < 1e-4
    assert result["cached_positions"] == len(ids[0]) - 1 + 64 - 1  # all but the last prompt token


class _NonCausal:
    """torch.nn.functional with SDPA's masks ignored (a dropped causal/padding mask)."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False):
        return F.scaled_dot_product_attention(q, k, v)


def _shifted_cache(original):
    def build(model, keys, values):  # the cache loses its first position (an off-by-one)
        return original(model, [k[:, :, 1:] for k in keys], [v[:, :, 1:] for v in values])

    return build


@pytest.mark.parametrize(
    "bug",
    [
        ("dymu.vtu.apply_rope", lambda x, cos, sin: x),
        ("dymu.vtu.F", _NonCausal()),
        ("dymu.generation.new_cache", _shifted_cache(dymu.generation.new_cache)),
    ],
    ids=["rope-dropped", "mask-dropped", "cache-shifted"],
)
def test_identity_check_catches_planted_bugs_at_the_bf16_tolerance(tiny_inputs, monkeypatch, bug) -> None:
    model, ids, pixels = tiny_inputs
    monkeypatch.setattr(*bug)
    result = identity_check(model.model, model.parts, ids, pixels, tolerance=BF16_TOLERANCE)
    assert result["status"] == "fail"
    assert any("KV cache" in p for p in result["problems"]), result


def test_dymu_check_with_calibrated_thresholds(tiny_inputs, calibrated) -> None:
    model, ids, pixels = tiny_inputs
    result = dymu_check(model.model, model.parts, ids, pixels, calibrated, new_tokens=4)
    assert result["status"] == "pass", result["problems"]
    assert all(1 <= n < 64 for n in result["visual_tokens"])  # it merged, and kept at least one


def test_dymu_check_flags_a_token_count_outside_the_tower(tiny_inputs, calibrated, monkeypatch) -> None:
    model, ids, pixels = tiny_inputs
    original = dymu.generation.prepare

    def broken(*args, **kwargs):
        batch = original(*args, **kwargs)
        batch.visual_tokens = [0] * len(batch.visual_tokens)
        return batch

    monkeypatch.setattr("dymu.matrix.full_size.prepare", broken)
    result = dymu_check(model.model, model.parts, ids, pixels, calibrated, new_tokens=2)
    assert result["status"] == "fail" and "outside" in result["problems"][0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the stage runs for real")
def test_full_size_stage_is_not_applicable_without_cuda() -> None:
    assert stage_full_size()["status"] == "n.a."


def test_bf16_rounding_check_compares_with_stocks_own_drift(
    tiny_checkpoints, tiny_inputs, monkeypatch
) -> None:
    from dymu.matrix.full_size import dymu_run, rounding_check, stock_run

    model, ids, pixels = tiny_inputs
    low = dymu.load(tiny_checkpoints["llava-hf-tiny-safetensors"], dtype=torch.bfloat16)
    truth = stock_run(model.model, model.parts, ids, pixels)
    stock_low = stock_run(low.model, low.parts, ids, pixels.bfloat16())
    result = rounding_check(truth, stock_low, dymu_run(low.parts, ids, pixels.bfloat16(), None))
    assert result["status"] == "pass", result["problems"]
    assert result["stock_low_vs_fp32"]["cache_relative_error"] > 0  # bf16 really rounds
    monkeypatch.setattr("dymu.vtu.apply_rope", lambda x, cos, sin: x)
    broken = rounding_check(truth, stock_low, dymu_run(low.parts, ids, pixels.bfloat16(), None))
    assert broken["status"] == "fail" and "KV cache" in broken["problems"][0]
