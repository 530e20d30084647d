"""The DToMe CLIP encoder blocks (docs/algorithm.md section 1): our own block forward over HF weights.

We own the encoder-block forward (LayerNorms, q/k/v/out projections, torch SDPA with the
log-size bias, MLP) and reuse HF `CLIPVisionModel` weights as they are. Only module
attributes that have been stable since transformers 4.37 are touched (`embeddings`,
`pre_layrnorm`, `encoder.layers[i].{layer_norm1, self_attn.*_proj, layer_norm2, mlp}`), so
attention-class refactors in transformers cannot break it. `tower.py` runs these blocks
eagerly or through `cuda_graph.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DymuError
from .merge import Edges, apply_plan, bipartite_edges, plan_merges, threshold_merges

MergeRule = Callable[[int, Edges], torch.Tensor]
# padded token slots are trimmed to a multiple of this: kernels (cuDNN attention plans, CUDA graphs)
# are built per shape, and exact lengths would make nearly every image a new shape
BUCKET = 32


def vision_transformer(model: nn.Module) -> nn.Module:
    """Find the CLIP vision transformer inside a CLIPVisionModel, a llava tower, or itself."""
    for path in ("vision_model", "vision_tower.vision_model", ""):
        obj = model
        for attr in filter(None, path.split(".")):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "embeddings") and hasattr(obj, "encoder"):
            return obj
    raise DymuError(f"{type(model).__name__} is not a CLIP vision model: pass a transformers CLIPVisionModel")


def layers_to_run(num_layers: int, feature_layer: int) -> int:
    """How many blocks produce `hidden_states[feature_layer]` (entry 0 is the embeddings)."""
    n = num_layers + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= n <= num_layers:
        raise DymuError(f"feature_layer={feature_layer} is outside a {num_layers}-layer tower")
    return n


def threshold_rule(thresholds: torch.Tensor | None, num_layers: int) -> tuple[MergeRule, list[bool]]:
    """Inference merge rule for per-layer thresholds, and which layers can merge at all."""
    if thresholds is None:
        return (lambda layer, edges: torch.zeros_like(edges.score, dtype=torch.bool)), [False] * num_layers
    tau = thresholds.detach().float().cpu()
    if tau.shape != (num_layers,):
        raise DymuError(
            f"thresholds have shape {tuple(tau.shape)} but the tower has {num_layers} layers: "
            "use a thresholds file calibrated for this vision tower"
        )
    values = tau.tolist()
    return (lambda layer, edges: threshold_merges(edges, values[layer])), [v != math.inf for v in values]


def proportional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + log size_j) v, i.e. attention over keys repeated size_j times.

    A padded key has size 0, so log 0 = -inf masks it with no separate mask. (An
    augmented-value variant that keeps SDPA's bias-free flash kernel was measured on an
    H200 and was slower overall: the extra pad/cat passes cost more than it saved.)
    """
    if size is None:
        return F.scaled_dot_product_attention(q, k, v)
    bias = size.float().log()[:, None, None, :].to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _attention(layer: nn.Module, h: torch.Tensor, size: torch.Tensor | None, heads: int):
    """CLIP self-attention with proportional attention; returns (output, keys per head)."""
    attn = layer.self_attn
    bsz, n, dim = h.shape
    shape = (bsz, n, heads, dim // heads)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    out = proportional_attention(q, k, v, size)
    return attn.out_proj(out.transpose(1, 2).reshape(bsz, n, dim)), k


@dataclass
class TokenState:
    """Padded tower state between blocks: what a CUDA graph captures and replays."""

    x: torch.Tensor  # (B, N, D), CLS first
    size: torch.Tensor  # (B, N) patches per token; 0 on padding
    pos: torch.Tensor  # (B, P + 1) original position -> token
    lengths: torch.Tensor  # (B,)
    counts: torch.Tensor  # (B, blocks run so far) tokens after each block
    uniform: bool = True  # every size is 1 and nothing padded: attention needs no bias

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.x, self.size, self.pos, self.lengths, self.counts)

    def trimmed(self, n: int) -> TokenState:
        """Keep the first `n` token slots (n >= every length)."""
        return TokenState(self.x[:, :n], self.size[:, :n], self.pos, self.lengths, self.counts, self.uniform)


def embed(vt: nn.Module, pixel_values: torch.Tensor) -> TokenState:
    """Patch + position embeddings and the pre-LayerNorm: the state entering block 0."""
    dtype = vt.embeddings.patch_embedding.weight.dtype
    x = vt.pre_layrnorm(vt.embeddings(pixel_values.to(dtype)))
    bsz, n, _ = x.shape
    device = x.device
    return TokenState(
        x=x,
        size=torch.ones(bsz, n, dtype=torch.float32, device=device),
        pos=torch.arange(n, device=device)[None].repeat(bsz, 1),
        lengths=torch.full((bsz,), n, dtype=torch.long, device=device),
        counts=torch.zeros(bsz, 0, dtype=torch.long, device=device),
    )


def run_blocks(
    vt: nn.Module,
    state: TokenState,
    start: int,
    stop: int,
    rule: MergeRule,
    may_merge: list[bool],
    static: bool,
) -> TokenState:
    """DToMe blocks `start..stop-1` on `state`.

    `static=False` trims the padded length after every merge (one host sync per merging
    layer; best on CPU). `static=True` keeps every shape fixed and never syncs, so the
    blocks can be captured in a CUDA graph; merges and outputs are the same.
    """
    heads = vt.config.num_attention_heads
    x, size, pos, lengths, uniform = state.x, state.size, state.pos, state.lengths, state.uniform
    counts = [state.counts]
    for i in range(start, stop):
        block = vt.encoder.layers[i]
        attn_out, keys = _attention(block, block.layer_norm1(x), None if uniform else size, heads)
        x = x + attn_out
        if may_merge[i]:
            edges = bipartite_edges(keys.mean(1), lengths)
            plan = plan_merges(rule(i, edges), edges.dst, lengths, x.shape[1])
            if static:
                x, size, pos = apply_plan(plan, x, size, pos, x.shape[1])
                lengths, uniform = plan.new_lengths, False
            else:
                new_max, any_changed = torch.stack([plan.new_lengths.max(), plan.changed.any()]).tolist()
                if any_changed:  # trim to a bucket: a few shapes, not one per image (new shapes cost plans)
                    x, size, pos = apply_plan(
                        plan, x, size, pos, min(x.shape[1], -(-new_max // BUCKET) * BUCKET)
                    )
                    lengths, uniform = plan.new_lengths, False
        x = x + block.mlp(block.layer_norm2(x))
        counts.append(lengths[:, None])
    return TokenState(x, size, pos, lengths, torch.cat(counts, dim=1), uniform)


def forward_tokens(
    vt: nn.Module,
    pixel_values: torch.Tensor,
    rule: MergeRule,
    may_merge: list[bool],
    n_run: int,
    static: bool,
) -> TokenState:
    """Embeddings and the first `n_run` DToMe blocks in one go (eager, or one static graph)."""
    return run_blocks(vt, embed(vt, pixel_values), 0, n_run, rule, may_merge, static)
