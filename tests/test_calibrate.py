"""Calibration: held-out token count near the target, and repeatability."""

from __future__ import annotations

import pytest
import torch
from clip_models import blocky_pixels, vitl_geometry_clip

import dymu
from dymu import DymuError
from dymu.calibration import merge_schedule


def test_schedule_spreads_merges_over_the_blocks_that_run() -> None:
    schedule = merge_schedule(576, 72, 23)
    assert sum(schedule) == 504 and max(schedule) - min(schedule) <= 1
    with pytest.raises(DymuError, match="target_tokens"):
        merge_schedule(64, 0, 3)


@pytest.mark.parametrize("target", [72, 192])
def test_held_out_mean_tokens_within_15_percent(target: int, record_property) -> None:
    model = vitl_geometry_clip()
    calib = blocky_pixels(96, 336, seed=10)
    held_out = blocky_pixels(96, 336, seed=20)
    tau = dymu.calibrate(model, calib, target_tokens=target, batch_size=32, progress=False)
    assert tau.shape == (24,) and torch.isinf(tau[-1]) and torch.isfinite(tau[:-1]).all()
    tokens = dymu.encode_images(model, held_out, tau).num_tokens.float()
    mean = float(tokens.mean())
    record_property("held_out_mean_tokens", mean)
    print(f"target {target}: held-out mean {mean:.1f} tokens (std {float(tokens.std()):.1f})")
    assert abs(mean - target) <= 0.15 * target
    assert tokens.std() > 0, "dynamic merging should give image-dependent counts"


def test_calibration_is_repeatable() -> None:
    model = vitl_geometry_clip()
    pixels = blocky_pixels(24, 336, seed=11)
    first = dymu.calibrate(model, pixels, target_tokens=72, batch_size=8, progress=False)
    second = dymu.calibrate(model, pixels, target_tokens=72, batch_size=8, progress=False)
    assert torch.equal(first, second)


def test_calibrate_from_pil_images_uses_the_processor(tiny_checkpoints) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from dymu.testing.sample_images import make_sample_images

    model = CLIPVisionModel.from_pretrained(str(tiny_checkpoints["clip"])).eval()
    processor = CLIPImageProcessor.from_pretrained(str(tiny_checkpoints["clip"]))
    images = make_sample_images(8)
    tau = dymu.calibrate(model, images, target_tokens=16, batch_size=4, processor=processor, progress=False)
    assert tau.shape == (4,) and torch.isfinite(tau[:3]).all()
    with pytest.raises(DymuError, match="processor"):
        dymu.calibrate(model, images, target_tokens=16, progress=False)
