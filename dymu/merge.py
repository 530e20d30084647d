"""DToMe merging math: pure tensor functions, no model knowledge (docs/algorithm.md section 1).

A batch of token sequences is padded to a common length N; `lengths` (B,) says how
many leading tokens of each row are real. Token 0 of every row is CLS.

Bipartite split over the *current* order: set A = even positions (CLS included and
protected), set B = odd positions. A-token `a` sits at position 2a, B-token `b` at 2b+1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .scatter import group_sum

NEG_INF = float("-inf")


class Edges(NamedTuple):
    """Best B-partner of every A token: `score` (B, NA) cosine (-inf where invalid), `dst` (B, NA)."""

    score: torch.Tensor
    dst: torch.Tensor


def bipartite_edges(metric: torch.Tensor, lengths: torch.Tensor) -> Edges:
    """Score every A token against every B token and keep its best match.

    `metric` is (B, N, d), one key-like vector per token. CLS and padded tokens
    get -inf so they are never merged and never chosen as destinations.
    """
    metric = F.normalize(metric.float(), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)  # (B, NA, NB)
    na, nb = a.shape[1], b.shape[1]
    device = metric.device
    a_valid = (torch.arange(na, device=device) * 2)[None] < lengths[:, None]
    b_valid = (torch.arange(nb, device=device) * 2 + 1)[None] < lengths[:, None]
    a_valid[:, 0] = False  # CLS is protected
    scores = scores.masked_fill(~b_valid[:, None, :], NEG_INF)
    if nb == 0:
        shape = (metric.shape[0], na)
        return Edges(
            torch.full(shape, NEG_INF, device=device), torch.zeros(shape, dtype=torch.long, device=device)
        )
    best, dst = scores.max(dim=-1)
    best = best.masked_fill(~a_valid, NEG_INF)
    return Edges(best, dst)


def threshold_merges(edges: Edges, tau: float | torch.Tensor) -> torch.Tensor:
    """Inference rule: merge every A token whose best score is strictly above `tau`."""
    return edges.score > tau


def top_k_merges(edges: Edges, k: int) -> tuple[torch.Tensor, float]:
    """Calibration rule: merge exactly the `k` best edges of the whole batch.

    Returns the (B, NA) merge mask and the batch threshold: the score of the best
    edge left unmerged, clamped to >= 0 (0 when every candidate edge merged).
    Ties are broken by position (stable sort) so calibration is repeatable.
    """
    flat = edges.score.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices
    n_candidates = int(torch.isfinite(flat).sum())
    k = max(0, min(k, n_candidates))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:k]] = True
    tau_b = float(flat[order[k]]) if k < n_candidates else 0.0
    return mask.view_as(edges.score), max(tau_b, 0.0)


class MergePlan(NamedTuple):
    """Where each current token goes: `target` (B, N) new position (N = dropped padding)."""

    target: torch.Tensor
    new_lengths: torch.Tensor
    changed: torch.Tensor  # (B,) rows with at least one merge


def plan_merges(merge_a: torch.Tensor, dst: torch.Tensor, lengths: torch.Tensor, n: int) -> MergePlan:
    """Turn a merge mask over A tokens into a token -> new-position map.

    New order per merged row: unmerged A tokens (previous order, CLS first), then all
    B tokens. A row without merges keeps its order untouched (the spec's "no merge,
    no reorder"), since every later A/B split depends on it.
    """
    bsz, na = merge_a.shape
    nb = n // 2
    device = merge_a.device
    a_pos = torch.arange(na, device=device) * 2
    b_pos = torch.arange(nb, device=device) * 2 + 1
    a_valid = a_pos[None] < lengths[:, None]
    b_valid = b_pos[None] < lengths[:, None]
    merge_a = merge_a & a_valid
    keep_a = a_valid & ~merge_a
    n_keep = keep_a.sum(1)
    n_b = b_valid.sum(1)

    a_target = torch.where(keep_a, keep_a.cumsum(1) - 1, n_keep[:, None] + dst)
    a_target = a_target.masked_fill(~a_valid, n)
    b_target = (n_keep[:, None] + torch.arange(nb, device=device)[None]).masked_fill(~b_valid, n)

    target = torch.empty(bsz, n, dtype=torch.long, device=device)
    target[:, 0::2] = a_target
    target[:, 1::2] = b_target

    changed = merge_a.any(1)
    identity = torch.arange(n, device=device)[None].expand(bsz, n)
    identity = identity.masked_fill(identity >= lengths[:, None], n)
    target = torch.where(changed[:, None], target, identity)
    new_lengths = torch.where(changed, n_keep + n_b, lengths)
    return MergePlan(target, new_lengths, changed)


def _spread_padding(target: torch.Tensor, n: int) -> torch.Tensor:
    """Send every padding token (target n) to its own slot, its position j, for the sums.

    Why: a static-shape row merged down to a few dozen tokens has hundreds of padding tokens, and
    summed into one slot their atomic adds serialise on it (zeros, but the atomics still queue).
    Slot j is free: a padding token sits at or after its row's length, which no merge increases,
    so j is a padding slot of the result too, and the token's weight (size) is 0 there anyway."""
    # expanded, not broadcast: torch 2.5.1's inductor (CPU) compiled the broadcast `where` into wrong
    # merges (tests/test_compiled_tower.py in the bin-guard cell); the expanded form compiles right
    own = torch.arange(n, device=target.device)[None].expand_as(target)
    return torch.where(target == n, own, target)


def apply_plan(
    plan: MergePlan, x: torch.Tensor, size: torch.Tensor, pos: torch.Tensor, out_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge tokens by size-weighted mean, sum sizes and re-point `pos`.

    `x` (B, N, D), `size` (B, N) (0 on padding), `pos` (B, P) original position ->
    current token. The result keeps `out_len` token slots (>= every new length).
    Sums are accumulated in float32 whatever the dtype. (A single bf16 assignment-matrix
    bmm was measured on an H200 and was no faster.) No host-device sync, so the step
    can be captured in a CUDA graph.
    """
    bsz, n, dim = x.shape
    slots = n  # padding sums into its own (padding) slot: every target is below n
    w = size.float()
    flat_target = (
        _spread_padding(plan.target, n) + torch.arange(bsz, device=x.device)[:, None] * slots
    ).flatten()
    den = group_sum(w.reshape(-1), flat_target, bsz * slots).view(bsz, slots)
    num = group_sum((x.float() * w[..., None]).reshape(bsz * n, dim), flat_target, bsz * slots)
    merged_x = (num.view(bsz, slots, dim)[:, :out_len] / den[:, :out_len, None].clamp_min(1e-12)).to(x.dtype)
    if x.dtype == torch.float32:  # unmerged rows bit-exact; in 16-bit the cast already rounds back to x
        merged_x = torch.where(plan.changed[:, None, None], merged_x, x[:, :out_len])
    new_size = torch.where(plan.changed[:, None], den[:, :out_len], size[:, :out_len])
    new_pos = plan.target.gather(1, pos)
    return merged_x, new_size, new_pos
