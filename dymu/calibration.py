"""Threshold calibration, batch level (docs/algorithm.md section 2).

Each batch of B images runs through the tower merging exactly the top r_l*B edges of
the whole batch at layer l (simple images absorb more merges than busy ones). The
batch threshold is the best unmerged score, clamped to >= 0; the layer threshold is
the running mean over batches, accumulated in float64 (the reference used bf16,
which quantised its thresholds to multiples of 1/256).

`target_tokens` is the mean number of tokens delivered at `feature_layer` (what the
LLM receives), so r is spread over the blocks up to and including that layer. The
official "72out" files instead spread r = 21 over all 24 blocks; at LLaVA's layer -2
they deliver about 89-94 tokens, not 72.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from .blocks import layers_to_run, vision_transformer
from .errors import DymuError
from .images import batches, preprocess
from .merge import Edges, top_k_merges
from .tower import run_tower


def default_target_tokens(num_patches: int) -> int:
    """The default calibration target: an eighth of the patches, as the official "72out" files
    are for LLaVA-1.5's 576 (8 for the tiny model's 64); one rule for `calibrate` and `bench`."""
    return max(1, round(num_patches / 8))


def merge_schedule(num_patches: int, target_tokens: int, n_layers: int) -> list[int]:
    """Integer merges per image for each of `n_layers` blocks, summing to patches - target."""
    if not 0 < target_tokens <= num_patches:
        raise DymuError(f"target_tokens={target_tokens} must be in 1..{num_patches} (patches per image)")
    total = num_patches - target_tokens
    base, extra = divmod(total, n_layers)
    return [base + (1 if i < extra else 0) for i in range(n_layers)]


def _pixel_batches(
    images: torch.Tensor | Iterable[Image.Image | str | Path], batch_size: int, processor: Any
) -> Iterator[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise DymuError(f"calibration pixels must be (N, 3, H, W), got {tuple(images.shape)}")
        yield from images.split(batch_size)
        return
    if processor is None:
        raise DymuError(
            "calibrating from images or paths needs the checkpoint's image processor (processor=...)"
        )
    for chunk in batches(images, batch_size):
        yield preprocess(chunk, processor)


def calibrate(
    vision_model: nn.Module,
    images: torch.Tensor | Iterable[Image.Image | str | Path],
    target_tokens: int = 72,
    batch_size: int = 64,
    processor: Any = None,
    feature_layer: int = -2,
    progress: bool = True,
) -> torch.Tensor:
    """Per-layer thresholds (L,) that deliver about `target_tokens` tokens at `feature_layer`.

    Layers after `feature_layer` never run for LLaVA and get +inf (no merge).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DymuError(f"batch_size={batch_size!r}: must be a positive integer")
    if isinstance(images, torch.Tensor) and images.numel() == 0:
        raise DymuError("calibration got an empty pixel tensor; pass (N, 3, H, W) pixels with N >= 1")
    vt = vision_transformer(vision_model)
    num_layers = len(vt.encoder.layers)
    n_run = layers_to_run(num_layers, feature_layer)
    num_patches = (vt.config.image_size // vt.config.patch_size) ** 2
    schedule = merge_schedule(num_patches, target_tokens, n_run)
    device = vt.embeddings.patch_embedding.weight.device

    sums = torch.zeros(num_layers, dtype=torch.float64)
    n_batches = 0
    total = None
    if isinstance(images, torch.Tensor):
        total = -(-images.shape[0] // batch_size)
    elif hasattr(images, "__len__"):
        total = -(-len(images) // batch_size)  # type: ignore[arg-type]

    bar = tqdm(total=total, desc="calibrating", unit="batch", disable=not progress, file=sys.stderr)
    for pixels in _pixel_batches(images, batch_size, processor):
        bsz = pixels.shape[0]
        batch_tau = torch.zeros(num_layers, dtype=torch.float64)

        def rule(
            layer: int, edges: Edges, bsz: int = bsz, batch_tau: torch.Tensor = batch_tau
        ) -> torch.Tensor:
            mask, tau_b = top_k_merges(edges, schedule[layer] * bsz)
            batch_tau[layer] = tau_b
            return mask

        run_tower(
            vision_model,
            pixels.to(device),
            rule,
            [True] * n_run + [False] * (num_layers - n_run),
            feature_layer,
        )
        sums += batch_tau
        n_batches += 1
        bar.update(1)
    bar.close()
    if n_batches == 0:
        raise DymuError("calibration got no images")
    thresholds = (sums / n_batches).float()
    thresholds[n_run:] = float("inf")
    return thresholds
