"""Shared pytest fixtures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import dymu
from dymu.compat.shims import bin_blocked
from dymu.errors import DymuError
from dymu.testing.sample_images import make_sample_images
from dymu.testing.tiny import TinySpec, build_tiny_checkpoints, ensure_tiny_checkpoints
from dymu.vision_loading import load_vision_tower


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny LLaVA-1.5 fixture in both formats with its seeded RANDOM weights, built once per
    test session (dir name -> path). The plumbing tests want it: random weights never emit EOS,
    so every generation runs its full length, and their similarities are well separated. The
    trained model (what `dymu infer` uses) is `trained_checkpoints`."""
    return build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"), TinySpec(weights="random"))


@pytest.fixture(scope="session")
def trained_checkpoints() -> dict[str, Path]:
    """The embedded tiny model, trained on the shapes task (the cached build `dymu infer` uses)."""
    return ensure_tiny_checkpoints()


@pytest.fixture(scope="session")
def images():
    """Eight structured sample images (flat regions, textures, two non-square)."""
    return make_sample_images(8)


@pytest.fixture(scope="session")
def calibrated(tiny_checkpoints, images):
    """Thresholds for the tiny CLIP tower, calibrated to 16 of 64 tokens on the sample images."""
    tower, processor = load_vision_tower(tiny_checkpoints["clip"])
    return dymu.calibrate(tower, images, target_tokens=16, batch_size=8, processor=processor, progress=False)


@pytest.fixture
def load_unmerged():
    """`dymu.load(path)` with merging off; where this stack refuses `.bin` weights, check that
    refusal names the fix and return None instead."""

    def load(path, serialization: str):
        if serialization == "bin" and bin_blocked():
            with pytest.raises(DymuError, match=r"only \.bin weights.*dymu convert"):
                dymu.load(path)
            return None
        return dymu.load(path, thresholds=torch.full((4,), math.inf))

    return load
