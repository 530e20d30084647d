"""DToMe thresholds for the tiny model's tower, by one fixed recipe.

Why one place: `dymu infer`'s default DyMU run and the golden file's inputs (the probes on the
random-weight tower, the shapes task on the trained one) must use the same calibration, or the
matrix would check other thresholds than the ones users see.
"""

from __future__ import annotations

import torch

from ..calibration import calibrate
from ..vision_loading import load_vision_tower
from .sample_images import make_sample_images
from .tiny import TinySpec, ensure_tiny_checkpoints

TARGET_TOKENS = 16  # of the tiny tower's 64 patches
CALIBRATION_IMAGES = 16


def tiny_thresholds(spec: TinySpec | None = None) -> torch.Tensor:
    """Thresholds calibrated on 16 generated sample images (seed 1) for a mean of 16 tokens;
    `spec` None is the embedded (trained) model."""
    tower, processor = load_vision_tower(ensure_tiny_checkpoints(spec=spec or TinySpec())["clip"])
    images = make_sample_images(CALIBRATION_IMAGES, seed=1)
    return calibrate(tower, images, TARGET_TOKENS, CALIBRATION_IMAGES, processor, progress=False)
