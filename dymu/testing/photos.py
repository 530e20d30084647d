"""Benchmark and calibration inputs: generated structured images plus, where the packages
are installed, the real photographs that ship inside scikit-image and matplotlib wheels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .sample_images import make_sample_images


def packaged_photos() -> list[Image.Image]:
    """Photos bundled in installed wheels (skimage.data, matplotlib sample data); [] if absent."""
    photos: list[Image.Image] = []
    try:
        from skimage import data  # noqa: PLC0415 - optional dependency

        for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field"):
            try:
                photos.append(Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB"))
            except (
                Exception
            ):  # some are downloaded on first use (no network here): skip those, whatever fails
                continue
    except ImportError:
        pass
    try:
        from matplotlib import cbook  # noqa: PLC0415 - optional dependency

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            photos.append(Image.open(f).convert("RGB"))
    except (ImportError, OSError, ValueError):
        pass
    return photos


def bench_images(n: int, seed: int = 0, size: int = 336) -> list[Image.Image]:
    """`n` images: random crops of packaged photos (if any) interleaved with generated ones."""
    rng = np.random.default_rng(seed)
    photos = packaged_photos()
    generated = make_sample_images(n, size=size, seed=seed)
    out: list[Image.Image] = []
    for i in range(n):
        if photos and i % 2 == 0:
            photo = photos[int(rng.integers(len(photos)))]
            w, h = photo.size
            scale = float(rng.uniform(0.5, 1.0))
            cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            out.append(photo.crop((x0, y0, x0 + cw, y0 + ch)))
        else:
            out.append(generated[i])
    return out
