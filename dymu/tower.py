"""The DToMe CLIP vision tower (docs/algorithm.md section 1): thresholds in, merged features and
the patch -> token mapping out. The blocks are in `blocks.py`; on CUDA they replay as graph
segments (`cuda_graph.py`), elsewhere they run eagerly. Both give the same merges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import MergeRule, TokenState, forward_tokens, layers_to_run, threshold_rule, vision_transformer
from .cuda_graph import graphed_forward
from .errors import DymuError
from .options import DEFAULT, Options


@dataclass
class TowerOutput:
    """Per-image merged patch features at the feature layer (CLS dropped).

    `features[i]` (N_i, D), `mapping[i]` (P,) patch -> merged index, `sizes[i]` (N_i,)
    patches per merged token, `tokens_per_layer` (B, L) token count (CLS included) at
    the output of every block; blocks after the feature layer do not run and repeat
    the last count. `padded` (B, max N_i, D) and `num_tokens` (B,) are the same
    features in one padded tensor for batched consumers.
    """

    features: list[torch.Tensor]
    mapping: list[torch.Tensor]
    sizes: list[torch.Tensor]
    tokens_per_layer: torch.Tensor
    padded: torch.Tensor
    num_tokens: torch.Tensor


def finish(state: TokenState, num_layers: int) -> TowerOutput:
    """Drop CLS, cut padding and split per image (one host sync)."""
    n_run = state.counts.shape[1]
    counts = torch.cat([state.counts, state.counts[:, -1:].expand(-1, num_layers - n_run)], dim=1)
    lengths = state.lengths.tolist()
    num_tokens = state.lengths - 1
    padded = state.x[:, 1 : max(lengths)]
    return TowerOutput(
        features=[padded[b, : lengths[b] - 1] for b in range(len(lengths))],
        mapping=list((state.pos[:, 1:] - 1).unbind(0)),
        sizes=[state.size[b, 1 : lengths[b]] for b in range(len(lengths))],
        tokens_per_layer=counts,
        padded=padded,
        num_tokens=num_tokens,
    )


@torch.no_grad()
def run_tower(
    model: nn.Module,
    pixel_values: torch.Tensor,
    rule: MergeRule,
    may_merge: list[bool],
    feature_layer: int = -2,
    static: bool = False,
) -> TowerOutput:
    """Run the DToMe tower with any merge rule (thresholds for inference, top-k for calibration)."""
    vt = vision_transformer(model)
    num_layers = len(vt.encoder.layers)
    n_run = layers_to_run(num_layers, feature_layer)
    return finish(forward_tokens(vt, pixel_values, rule, may_merge, n_run, static), num_layers)


@torch.no_grad()
def encode_images(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    thresholds: torch.Tensor | None,
    feature_layer: int = -2,
    options: Options = DEFAULT,
) -> TowerOutput:
    """Encode preprocessed images with DToMe; `thresholds=None` (or all +inf) is stock CLIP.

    On CUDA with `options.cuda_graphs` the static-shape tower is captured once per input
    shape and replayed (with `options.compile_tower`, its blocks compiled by torch.compile);
    otherwise the padded length shrinks as tokens merge. All give the same merges and features
    up to floating-point rounding (in 16-bit, a score that rounds across its threshold can flip
    a merge).
    """
    vt = vision_transformer(vision_model)
    size = vt.config.image_size
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[0] == 0:
        shape = (
            tuple(pixel_values.shape)
            if isinstance(pixel_values, torch.Tensor)
            else type(pixel_values).__name__
        )
        raise DymuError(f"pixel_values: expected a non-empty (N, 3, {size}, {size}) batch, got {shape}")
    num_layers = len(vt.encoder.layers)
    rule, may_merge = threshold_rule(thresholds, num_layers)
    n_run = layers_to_run(num_layers, feature_layer)
    state = None
    if pixel_values.is_cuda and options.cuda_graphs:
        key = None if thresholds is None else tuple(thresholds.detach().float().cpu().tolist())
        compiled = None
        if options.compile_tower:
            compiled = torch.full((num_layers,), math.inf) if thresholds is None else thresholds.detach()
        state = graphed_forward(
            vt, pixel_values, rule, may_merge, n_run, (key,), options.graph_segment, compiled
        )
    if state is None:
        state = forward_tokens(vt, pixel_values, rule, may_merge, n_run, static=False)
    return finish(state, num_layers)
