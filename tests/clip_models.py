"""CLIP towers (from dymu.testing.builders) and pixel batches for the DToMe tests (no downloads)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import CLIPVisionModel

from dymu.testing.builders import clip_from_config


def vitl_geometry_clip() -> CLIPVisionModel:
    """Real ViT-L/14-336 geometry (577 tokens, 24 layers) at a width that runs on CPU."""
    return clip_from_config(image_size=336, layers=24, hidden=32, heads=2)


def blocky_pixels(n: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """Normalised pixel batch mixing flat colour blocks (mergeable) and noise (not)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, image_size, image_size), dtype=np.float32)
    for i in range(n):
        cells = int(rng.integers(2, 8))
        block = -(-image_size // cells)
        flat = (
            rng.normal(size=(3, cells, cells)).repeat(block, 1).repeat(block, 2)[:, :image_size, :image_size]
        )
        noise = rng.normal(size=(3, image_size, image_size))
        weight = np.zeros((image_size, image_size), dtype=np.float32)
        frac = float(rng.uniform(0.0, 0.8))
        weight[:, : int(frac * image_size)] = 1.0
        out[i] = flat * (1 - weight) + noise * weight
    return torch.from_numpy(out)
