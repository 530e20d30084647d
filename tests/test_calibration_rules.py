"""Calibration's rules on a small seeded CLIP tower (64 patches, 4 blocks; fast): the merge schedule,
each batch's threshold reproducing exactly its top-k merges, the running mean over batches, the
layers that never run, input checks and the progress bar. The compat of `calibrate` with the real
ViT-L geometry is in test_calibrate.py (slow, not in the mutation group)."""

from __future__ import annotations

import math

import pytest
import torch
from clip_models import blocky_pixels
from transformers import CLIPImageProcessor

import dymu
from dymu import DymuError
from dymu.calibration import default_target_tokens, merge_schedule
from dymu.images import preprocess
from dymu.testing.builders import clip_from_config
from dymu.testing.sample_images import make_sample_images

SIZE = 112  # 8 x 8 patches of 14


@pytest.fixture(scope="module")
def tower():
    return clip_from_config(image_size=SIZE, layers=4, hidden=32, heads=2)


@pytest.fixture(scope="module")
def pixels():
    return blocky_pixels(6, SIZE, seed=3)


def test_default_target_is_an_eighth_of_the_patches_and_at_least_one() -> None:
    assert [default_target_tokens(n) for n in (576, 64, 12, 4, 1)] == [72, 8, 2, 1, 1]


def test_merge_schedule_gives_the_remainder_to_the_first_blocks() -> None:
    assert merge_schedule(10, 3, 3) == [3, 2, 2]
    assert merge_schedule(64, 20, 3) == [15, 15, 14]
    assert merge_schedule(64, 64, 2) == [0, 0]
    assert merge_schedule(64, 1, 1) == [63]


@pytest.mark.parametrize("target", [0, -1, 65])
def test_merge_schedule_refuses_a_target_outside_the_patches(target: int) -> None:
    with pytest.raises(DymuError) as err:
        merge_schedule(64, target, 3)
    assert str(err.value) == f"target_tokens={target} must be in 1..64 (patches per image)"


def test_one_batch_threshold_merges_exactly_its_schedule(tower, pixels) -> None:
    """The batch threshold is the best unmerged score: encoding the calibration batch with it makes
    exactly schedule[l] * B merges at each block that runs, and none in the block after layer -2."""
    tau = dymu.calibrate(tower, pixels, target_tokens=20, batch_size=6, progress=False)
    assert tau.dtype == torch.float32 and tau.shape == (4,)
    assert torch.isfinite(tau[:3]).all() and (tau[:3] >= 0).all() and math.isinf(tau[3]) and tau[3] > 0
    out = dymu.encode_images(tower, pixels, tau)
    merged_away = 6 * 64 - (out.tokens_per_layer[:, :3].sum(0) - 6)  # rows count CLS
    assert merged_away.tolist() == [6 * 15, 6 * 30, 6 * 44]
    assert int(out.num_tokens.sum()) == 6 * 20


def test_thresholds_are_the_mean_of_the_batches_in_float64(tower, pixels) -> None:
    first = dymu.calibrate(tower, pixels[:4], target_tokens=20, batch_size=4, progress=False)
    second = dymu.calibrate(tower, pixels[4:], target_tokens=20, batch_size=2, progress=False)
    both = dymu.calibrate(tower, pixels, target_tokens=20, batch_size=4, progress=False)
    assert torch.equal(both, ((first.double() + second.double()) / 2).float())


def test_the_mean_over_many_batches_is_accumulated_in_float64(tower, pixels) -> None:
    """Six one-image batches: a float32 running sum rounds differently from the float64 one."""
    singles = [dymu.calibrate(tower, pixels[i : i + 1], target_tokens=20, batch_size=1, progress=False)
               for i in range(6)]  # fmt: skip
    mean = dymu.calibrate(tower, pixels, target_tokens=20, batch_size=1, progress=False)
    assert torch.equal(mean, (torch.stack(singles).double().sum(0) / 6).float())


def test_the_defaults_are_llavas_target_64_image_batches_and_a_progress_bar(tower, capsys) -> None:
    with pytest.raises(DymuError, match=r"^target_tokens=72 must be in 1\.\.64"):  # LLaVA-1.5's 72 of 576
        dymu.calibrate(tower, blocky_pixels(1, SIZE))
    dymu.calibrate(tower, blocky_pixels(65, SIZE, seed=4), target_tokens=20)
    assert " 2/2 " in capsys.readouterr().err  # 64 + 1


def test_feature_layer_decides_the_blocks_that_calibrate(tower, pixels) -> None:
    tau = dymu.calibrate(tower, pixels, target_tokens=20, batch_size=6, feature_layer=-1, progress=False)
    assert torch.isfinite(tau).all()
    out = dymu.encode_images(tower, pixels, tau, feature_layer=-1)
    assert int(out.num_tokens.sum()) == 6 * 20
    tau = dymu.calibrate(tower, pixels, target_tokens=40, batch_size=6, feature_layer=1, progress=False)
    assert tau[0] > 0 and torch.isinf(tau[1:]).all()  # hidden_states[1]: block 0 only, 24 merges
    assert int(dymu.encode_images(tower, pixels, tau, feature_layer=1).num_tokens.sum()) == 6 * 40


def test_a_batch_of_one_image_is_allowed(tower, pixels) -> None:
    tau = dymu.calibrate(tower, pixels[:2], target_tokens=20, batch_size=1, progress=False)
    assert torch.isfinite(tau[:3]).all()


@pytest.mark.parametrize("batch_size", [0, -2, 1.5, "4", True])
def test_calibrate_refuses_a_batch_size_that_is_not_a_positive_integer(tower, pixels, batch_size) -> None:
    with pytest.raises(DymuError) as err:
        dymu.calibrate(tower, pixels, target_tokens=20, batch_size=batch_size, progress=False)
    assert str(err.value) == f"batch_size={batch_size!r}: must be a positive integer"


def test_calibrate_refuses_empty_or_misshapen_input(tower, pixels) -> None:
    with pytest.raises(DymuError) as err:
        dymu.calibrate(tower, pixels[:0], target_tokens=20, progress=False)
    assert str(err.value) == "calibration got an empty pixel tensor; pass (N, 3, H, W) pixels with N >= 1"
    with pytest.raises(DymuError) as err:
        dymu.calibrate(tower, pixels[0], target_tokens=20, progress=False)
    assert str(err.value) == f"calibration pixels must be (N, 3, H, W), got (3, {SIZE}, {SIZE})"
    with pytest.raises(DymuError) as err:
        dymu.calibrate(tower, [], target_tokens=20, processor=object(), progress=False)
    assert str(err.value) == "calibration got no images"
    with pytest.raises(DymuError) as err:
        dymu.calibrate(tower, [], target_tokens=20, progress=False)
    assert (
        str(err.value)
        == "calibrating from images or paths needs the checkpoint's image processor (processor=...)"
    )


def test_the_progress_bar_counts_batches_on_stderr_only_when_asked(tower, pixels, capsys) -> None:
    dymu.calibrate(tower, pixels, target_tokens=20, batch_size=4, progress=False)
    assert capsys.readouterr() == ("", "")
    dymu.calibrate(tower, pixels, target_tokens=20, batch_size=4, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "calibrating: 100%" in err and " 2/2 " in err and "batch/s" in err


def test_images_go_through_the_processor_in_batches(tower, capsys) -> None:
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    images = make_sample_images(5)
    tau = dymu.calibrate(tower, images, target_tokens=20, batch_size=2, processor=processor, progress=True)
    assert " 3/3 " in capsys.readouterr().err  # a list has a length: the bar knows the total
    pixels = preprocess(images, processor)
    assert torch.equal(tau, dymu.calibrate(tower, pixels, target_tokens=20, batch_size=2, progress=False))
    again = dymu.calibrate(
        tower, iter(images), target_tokens=20, batch_size=2, processor=processor, progress=True
    )
    err = capsys.readouterr().err
    assert torch.equal(again, tau) and "3batch" in err.replace(" ", "") and "/3" not in err
