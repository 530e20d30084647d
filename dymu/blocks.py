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
    projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj)
    return attention_from(h, *((p.weight, p.bias) for p in projections), size=size, heads=heads)


def attention_from(
    h: torch.Tensor,
    q: tuple[torch.Tensor, torch.Tensor],
    k: tuple[torch.Tensor, torch.Tensor],
    v: tuple[torch.Tensor, torch.Tensor],
    out: tuple[torch.Tensor, torch.Tensor],
    size: torch.Tensor | None,
    heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_attention` from (weight, bias) pairs: the same computation on plain tensors."""
    bsz, n, dim = h.shape
    shape = (bsz, n, heads, dim // heads)
    queries = F.linear(h, *q).view(shape).transpose(1, 2)
    keys = F.linear(h, *k).view(shape).transpose(1, 2)
    values = F.linear(h, *v).view(shape).transpose(1, 2)
    mixed = proportional_attention(queries, keys, values, size)
    return F.linear(mixed.transpose(1, 2).reshape(bsz, n, dim), *out), keys


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


# an encoder block's parameters in the order `static_block` unpacks them
_MODULES = ("layer_norm1", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
            "layer_norm2", "mlp.fc1", "mlp.fc2")  # fmt: skip
WEIGHT_NAMES = tuple(f"{module}.{kind}" for module in _MODULES for kind in ("weight", "bias"))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# CLIP's `hidden_act` values the functional block knows (HF's classes compute the same)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": _quick_gelu, "gelu": F.gelu, "gelu_new": _tanh_gelu, "gelu_pytorch_tanh": _tanh_gelu,
}  # fmt: skip


@dataclass(frozen=True)
class BlockSpec:
    """What the functional block needs besides tensors: the same for every block of a tower."""

    heads: int
    eps: float
    act: str


def functional_blocks(vt: nn.Module) -> tuple[BlockSpec, list[tuple[torch.Tensor, ...]]] | None:
    """Every block's weights as plain tensors, or None if the tower is not the CLIP block we know
    (another activation, LayerNorm eps or parameter layout): then only the module path runs."""
    act = getattr(vt.config, "hidden_act", None)
    layers = vt.encoder.layers
    eps = {getattr(block.layer_norm1, "eps", None) for block in layers} | {
        getattr(block.layer_norm2, "eps", None) for block in layers
    }
    if act not in ACTIVATIONS or len(eps) != 1 or None in eps:
        return None
    weights = []
    for block in layers:
        params = dict(block.named_parameters())
        if set(params) != set(WEIGHT_NAMES):
            return None
        weights.append(tuple(params[name] for name in WEIGHT_NAMES))
    return BlockSpec(vt.config.num_attention_heads, float(eps.pop()), act), weights


def static_block(
    x: torch.Tensor,
    size: torch.Tensor,
    pos: torch.Tensor,
    lengths: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    tau: torch.Tensor | None,
    spec: BlockSpec,
    uniform: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One static-shape DToMe block with the threshold rule (`tau` a 0-d tensor, None: no merging)
    as a function of tensors only, so one `torch.compile` serves every block of the tower;
    `run_blocks(static=True)` computes the same from the modules."""
    n1w, n1b, qw, qb, kw, kb, vw, vb, ow, ob, n2w, n2b, f1w, f1b, f2w, f2b = weights
    dim = (x.shape[-1],)
    h = F.layer_norm(x, dim, n1w, n1b, spec.eps)
    attn_out, keys = attention_from(
        h, (qw, qb), (kw, kb), (vw, vb), (ow, ob), None if uniform else size, spec.heads
    )
    x = x + attn_out
    if tau is not None:
        edges = bipartite_edges(keys.mean(1), lengths)
        plan = plan_merges(edges.score > tau, edges.dst, lengths, x.shape[1])
        x, size, pos = apply_plan(plan, x, size, pos, x.shape[1])
        lengths = plan.new_lengths
    h = F.layer_norm(x, dim, n2w, n2b, spec.eps)
    return x + F.linear(ACTIVATIONS[spec.act](F.linear(h, f1w, f1b)), f2w, f2b), size, pos, lengths


BlockStep = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def static_forward(
    vt: nn.Module,
    pixel_values: torch.Tensor,
    thresholds: torch.Tensor,
    may_merge: list[bool],
    n_run: int,
    blocks: tuple[BlockSpec, list[tuple[torch.Tensor, ...]]],
    step: BlockStep = static_block,
) -> TokenState:
    """Embeddings and the first `n_run` blocks through `step` (`static_block`, or it compiled), the
    thresholds a (layers,) tensor on the device read only where `may_merge`. Never syncs."""
    spec, weights = blocks
    state = embed(vt, pixel_values)
    x, size, pos, lengths, uniform = state.x, state.size, state.pos, state.lengths, True
    counts = []
    for i in range(n_run):
        tau = thresholds[i] if may_merge[i] else None
        x, size, pos, lengths = step(x, size, pos, lengths, weights[i], tau, spec, uniform)
        uniform = uniform and tau is None
        counts.append(lengths[:, None])
    return TokenState(x, size, pos, lengths, torch.cat(counts, dim=1), uniform)
