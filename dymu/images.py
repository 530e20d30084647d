"""Image loading and LLaVA-1.5 preprocessing (pad to square with the mean colour, then the
checkpoint's own image processor), with one-line errors for missing or corrupt files."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DymuError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# OpenAI CLIP normalisation (openai/clip-vit-large-patch14(-336)'s preprocessor_config.json)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, or raise a DymuError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DymuError(f"{path}: image not found; pass an existing image file")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except Image.DecompressionBombError as err:
        raise DymuError(f"{path}: image too large to decode safely ({err}); pass a smaller image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DymuError(
            f"{path}: not a readable image ({type(err).__name__}); pass a PNG/JPEG file"
        ) from None


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. 16- and 32-bit integer images (e.g. 16-bit PNGs, mode I;16) are scaled to 8 bits:
    PIL's own convert clips them, which turns most 16-bit photos white."""
    if image.mode.startswith("I"):
        pixels = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.clip(pixels * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder, sorted, so a calibration set is the same on every run."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DymuError(f"{folder}: image folder not found")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DymuError(f"{folder}: contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's `image_aspect_ratio="pad"`: centre the image on a square of `fill`."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def mean_fill(processor: Any) -> tuple[int, int, int]:
    """The processor's normalisation mean as an 8-bit RGB colour (what LLaVA pads with)."""
    mean = getattr(processor, "image_mean", None) or CLIP_MEAN
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


def preprocess(images: Sequence[Image.Image | str | Path], processor: Any, pad: bool = True) -> torch.Tensor:
    """Pixel tensor (N, 3, H, W) exactly as LLaVA-1.5 feeds its vision tower."""
    fill = mean_fill(processor)
    pil = [img if isinstance(img, Image.Image) else load_image(img) for img in images]
    pil = [pad_to_square(to_rgb(img), fill) if pad else to_rgb(img) for img in pil]
    return processor(images=pil, return_tensors="pt")["pixel_values"]


def batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
