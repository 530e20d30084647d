"""Deterministic synthetic test images with the structure token merging reacts to.

Why: DyMU's token count depends on image content (flat regions merge, texture and edges do not), and
no data set can be downloaded here. These images give tests, golden outputs and the benchmark a fixed,
varied input set: some mostly flat, some busy, some mixed, two with non-square aspect ratios so that
LLaVA's pad-to-square path is exercised.

Only integer numpy arithmetic and ``numpy.random.default_rng`` draws are used (no transcendental
functions, whose last bits may differ between numpy builds), so the pixels are identical on every
numpy/Pillow version.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# One recipe per index (cycled when n > len(KINDS)); each also gets its own RNG stream.
KINDS = ("flat", "busy", "mixed", "wide", "checker", "tall", "shapes", "noise_window")


def _color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3, dtype=np.int64)


def _canvas(h: int, w: int, color: np.ndarray) -> np.ndarray:
    return np.broadcast_to(color, (h, w, 3)).astype(np.int64).copy()


def _disk(h: int, w: int, cy: int, cx: int, r: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def _noise(rng: np.random.Generator, h: int, w: int, amp: int) -> np.ndarray:
    return rng.integers(-amp, amp + 1, size=(h, w, 3), dtype=np.int64)


def _flat(rng: np.random.Generator, s: int) -> np.ndarray:
    """Sky over ground over a band: three big flat colour regions, one straight edge each."""
    img = _canvas(s, s, _color(rng))
    horizon = int(rng.integers(s // 3, s // 2))
    img[horizon:] = _color(rng)
    img[s - s // 6 :] = _color(rng)
    return img


def _busy(rng: np.random.Generator, s: int) -> np.ndarray:
    """Per-pixel noise over fine diagonal stripes: nothing should merge."""
    y, x = np.mgrid[0:s, 0:s]
    period = int(rng.integers(3, 7))
    stripes = ((x + y) // period) % 2
    a, b = _color(rng), _color(rng)
    img = np.where(stripes[..., None] == 1, a, b)
    return img + _noise(rng, s, s, 60)


def _mixed(rng: np.random.Generator, s: int) -> np.ndarray:
    """Flat background, one noisy square, one flat disk with a hard edge."""
    img = _canvas(s, s, _color(rng))
    q = s // 3
    y0, x0 = int(rng.integers(0, s // 2)), int(rng.integers(0, s // 2))
    img[y0 : y0 + q, x0 : x0 + q] = _color(rng) + _noise(rng, q, q, 80)
    disk = _disk(s, s, int(rng.integers(s // 3, s - s // 4)), int(rng.integers(s // 3, s - s // 4)), s // 5)
    img[disk] = _color(rng)
    return img


def _wide(rng: np.random.Generator, s: int) -> np.ndarray:
    """Landscape (about 16:9): flat halves with a noisy strip; padding adds flat bars."""
    h = (s * 9) // 16
    img = _canvas(h, s, _color(rng))
    img[:, s // 2 :] = _color(rng)
    band = slice(h // 3, h // 3 + max(4, h // 6))
    img[band] += _noise(rng, img[band].shape[0], s, 90)
    return img


def _checker(rng: np.random.Generator, s: int) -> np.ndarray:
    """Left: small checkerboard (edges everywhere). Right: a slow integer gradient."""
    y, x = np.mgrid[0:s, 0:s]
    cell = int(rng.integers(4, 9))
    a, b = _color(rng), _color(rng)
    img = np.where((((x // cell) + (y // cell)) % 2)[..., None] == 1, a, b)
    c0, c1 = _color(rng), _color(rng)
    grad = c0 + ((c1 - c0) * y[..., None]) // max(s - 1, 1)
    right = x >= s // 2
    img[right] = grad[right]
    return img


def _tall(rng: np.random.Generator, s: int) -> np.ndarray:
    """Portrait (about 9:16): wide flat horizontal stripes, the bottom quarter noisy."""
    w = (s * 9) // 16
    img = _canvas(s, w, _color(rng))
    n = int(rng.integers(3, 5))
    for k in range(n):
        img[k * s // n : (k + 1) * s // n] = _color(rng)
    img[s - s // 4 :] += _noise(rng, s // 4, w, 70)
    return img


def _shapes(rng: np.random.Generator, s: int) -> np.ndarray:
    """Flat background with a few flat disks and a flat triangle: mostly flat, a few curved edges."""
    img = _canvas(s, s, _color(rng))
    for _ in range(3):
        cy, cx = (int(v) for v in rng.integers(s // 6, s - s // 6, size=2))
        img[_disk(s, s, cy, cx, int(rng.integers(s // 12, s // 5)))] = _color(rng)
    y, x = np.mgrid[0:s, 0:s]
    tri = (y >= s // 2) & (x >= s // 8) & (x - s // 8 <= y - s // 2)
    img[tri] = _color(rng)
    return img


def _noise_window(rng: np.random.Generator, s: int) -> np.ndarray:
    """Strong noise everywhere except one flat window: mostly busy."""
    img = _canvas(s, s, _color(rng)) + _noise(rng, s, s, 100)
    q = s // 3
    y0, x0 = (int(v) for v in rng.integers(0, s - q, size=2))
    img[y0 : y0 + q, x0 : x0 + q] = _color(rng)
    return img


_RECIPES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "flat": _flat,
    "busy": _busy,
    "mixed": _mixed,
    "wide": _wide,
    "checker": _checker,
    "tall": _tall,
    "shapes": _shapes,
    "noise_window": _noise_window,
}


def sample_image_array(index: int, size: int = 112, seed: int = 0) -> np.ndarray:
    """Pixels (H, W, 3) uint8 of sample ``index``; recipe ``KINDS[index % len(KINDS)]``."""
    if size < 16:
        raise ValueError("size must be at least 16 pixels")
    rng = np.random.default_rng([seed, index])
    arr = _RECIPES[KINDS[index % len(KINDS)]](rng, size)
    return np.clip(arr, 0, 255).astype(np.uint8)


def make_sample_images(n: int = 8, size: int = 112, seed: int = 0) -> list[Image.Image]:
    """``n`` deterministic RGB images; the longer side is ``size`` pixels (two are non-square)."""
    return [Image.fromarray(sample_image_array(i, size, seed)).convert("RGB") for i in range(n)]


def write_sample_images(out_dir: str | Path, n: int = 8, size: int = 112, seed: int = 0) -> list[Path]:
    """Write the images as ``sample_{i:02d}_{kind}.png`` into ``out_dir``; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(make_sample_images(n, size, seed)):
        path = out / f"sample_{i:02d}_{KINDS[i % len(KINDS)]}.png"
        img.save(path, format="PNG")
        paths.append(path)
    return paths
