"""The DToMe merge rules at the unit level (dymu/merge.py): edges, the strict threshold rule at a
tie, the calibration rule's threshold, and plan/apply against plain loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dymu.merge import (
    _spread_padding,
    apply_plan,
    bipartite_edges,
    plan_merges,
    threshold_merges,
    top_k_merges,
)


def _metric(seed: int, bsz: int = 3, n: int = 11, dim: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, n, dim, generator=gen)


def test_edges_are_each_a_tokens_best_cosine_partner_with_cls_and_padding_excluded() -> None:
    metric = _metric(0)
    lengths = torch.tensor([11, 8, 5])
    edges = bipartite_edges(metric, lengths)
    unit = F.normalize(metric.double(), dim=-1)
    for b, length in enumerate(lengths.tolist()):
        for a in range(edges.score.shape[1]):
            pos = 2 * a
            partners = [(float(unit[b, pos] @ unit[b, q]), (q - 1) // 2) for q in range(1, length, 2)]
            if pos == 0 or pos >= length or not partners:
                assert edges.score[b, a] == -math.inf
                continue
            best, dst = max(partners, key=lambda p: (p[0], -p[1]))
            assert edges.score[b, a].item() == pytest.approx(best, abs=1e-6)
            assert int(edges.dst[b, a]) == dst


def test_a_single_token_row_has_no_edges() -> None:
    edges = bipartite_edges(torch.randn(2, 1, 4), torch.tensor([1, 1]))
    assert edges.score.shape == (2, 1) and bool((edges.score == -math.inf).all())
    assert edges.dst.dtype == torch.long and bool((edges.dst == 0).all())


def test_a_threshold_exactly_equal_to_an_edge_score_does_not_merge() -> None:
    """The rule is strict (>): calibration puts each threshold exactly on an edge score, and that
    edge must stay unmerged. Just below the score it merges."""
    edges = bipartite_edges(_metric(1), torch.tensor([11, 11, 11]))
    finite = edges.score[torch.isfinite(edges.score)]
    for score in finite[:6].tolist():
        tie = threshold_merges(edges, score)
        assert not bool(tie[edges.score == score].any()), score
        assert bool((tie == (edges.score > score)).all())
        below = threshold_merges(edges, torch.tensor(score).nextafter(torch.tensor(-math.inf)).item())
        assert bool(below[edges.score == score].all())
    per_layer = torch.tensor(float(finite[0]))  # a 0-dim tensor threshold, as the tower passes it
    assert not bool(threshold_merges(edges, per_layer)[edges.score == finite[0]].any())


@pytest.mark.parametrize("k", [0, 1, 4, 9])
def test_top_k_merges_the_k_best_edges_and_its_threshold_reproduces_them(k: int) -> None:
    """Calibration's threshold is the best unmerged score: the inference rule at that threshold
    merges exactly the k edges calibration merged (no ties in random data)."""
    edges = bipartite_edges(_metric(2), torch.tensor([11, 9, 7]))
    mask, tau = top_k_merges(edges, k)
    scores = edges.score.flatten()
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i].item())
    assert int(mask.sum()) == k and set(mask.flatten().nonzero().flatten().tolist()) == set(ranked[:k])
    assert tau == max(scores[ranked[k]].item(), 0.0)
    if tau > 0:
        assert torch.equal(threshold_merges(edges, tau), mask)


def test_top_k_beyond_the_candidates_merges_all_and_reports_zero() -> None:
    edges = bipartite_edges(_metric(3, bsz=1, n=7), torch.tensor([7]))
    mask, tau = top_k_merges(edges, 100)
    assert torch.equal(mask, torch.isfinite(edges.score)) and tau == 0.0
    mask, tau = top_k_merges(edges, -2)
    assert not bool(mask.any())


def test_top_k_threshold_is_clamped_at_zero() -> None:
    """Anti-parallel tokens: every edge scores -1, and the reported threshold is 0, not -1."""
    metric = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]]])
    edges = bipartite_edges(metric, torch.tensor([5]))
    assert edges.score[0, 1:].tolist() == [-1.0, -1.0]
    mask, tau = top_k_merges(edges, 1)
    assert tau == 0.0 and int(mask.sum()) == 1
    assert bool(mask[0, 1]), "ties go to the first position (stable sort)"


def _naive_targets(merge: torch.Tensor, dst: torch.Tensor, length: int, n: int) -> list[int]:
    """New position of each token: kept A tokens in order, then every B token; merged A -> its B."""
    a_pos = list(range(0, length, 2))
    kept = [p for i, p in enumerate(a_pos) if not bool(merge[i])]
    n_b = len(range(1, length, 2))
    if len(kept) == len(a_pos):
        return [p if p < length else n for p in range(n)]
    target = [n] * n
    for j, p in enumerate(kept):
        target[p] = j
    for i, p in enumerate(a_pos):
        if bool(merge[i]):
            target[p] = len(kept) + int(dst[i])
    for j in range(n_b):
        target[2 * j + 1] = len(kept) + j
    return target


@pytest.mark.parametrize("tau", [0.2, 0.5, 2.0])
def test_plan_and_apply_match_plain_loops(tau: float) -> None:
    """Targets, new lengths, changed rows, size-weighted means and sizes against plain loops, on
    members that differ (so an unweighted or first-member merge would show)."""
    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([11, 8, 5])
    n, dim = 11, 3
    metric = _metric(4)
    x = torch.randn(3, n, dim, generator=gen)
    size = torch.randint(1, 5, (3, n), generator=gen).float() * (torch.arange(n)[None] < lengths[:, None])
    pos = torch.stack([torch.randint(0, int(length), (9,), generator=gen) for length in lengths])
    edges = bipartite_edges(metric, lengths)
    merge = threshold_merges(edges, tau)
    plan = plan_merges(merge, edges.dst, lengths, n)
    out_len = int(plan.new_lengths.max())
    got_x, got_size, got_pos = apply_plan(plan, x, size, pos, out_len)
    assert got_x.shape == (3, out_len, dim) and got_x.dtype == x.dtype
    for b, length in enumerate(lengths.tolist()):
        valid_merge = merge[b] & (torch.arange(merge.shape[1]) * 2 < length)
        target = _naive_targets(valid_merge, edges.dst[b], length, n)
        assert plan.target[b].tolist() == target
        assert bool(plan.changed[b]) == bool(valid_merge.any())
        new_len = length - int(valid_merge.sum())
        assert int(plan.new_lengths[b]) == new_len
        for slot in range(new_len):
            members = [t for t in range(length) if target[t] == slot]
            weights = size[b, members].double()
            want = (x[b, members].double() * weights[:, None]).sum(0) / weights.sum()
            torch.testing.assert_close(got_x[b, slot].double(), want, rtol=1e-5, atol=1e-6)
            assert got_size[b, slot].item() == weights.sum().item()
        if not plan.changed[b]:
            assert torch.equal(got_x[b, :new_len], x[b, :new_len])
        assert got_pos[b].tolist() == [target[p] for p in pos[b].tolist()]
    assert bool(plan.changed.any()) or tau == 2.0


def test_static_length_apply_sums_padding_into_distinct_padding_slots() -> None:
    """At the static length (out_len = n, what the graphed tower runs) every padding token sums into
    a slot of its own that is padding in the result too (one shared slot serialised hundreds of
    atomic adds on a GPU): no two tokens of a row share a padding slot, real slots never see the
    padding's (finite, large) values, and a merged row's padding slots come out zero with size 0."""
    gen = torch.Generator().manual_seed(9)
    lengths = torch.tensor([13, 6, 9, 3])
    bsz, n, dim = 4, 13, 4
    real = torch.arange(n)[None] < lengths[:, None]
    x = torch.where(real[..., None], torch.randn(bsz, n, dim, generator=gen), torch.full((bsz, n, dim), 1e4))
    size = torch.randint(1, 4, (bsz, n), generator=gen).float() * real
    pos = torch.zeros(bsz, 2, dtype=torch.long)
    edges = bipartite_edges(_metric(6, bsz, n), lengths)
    plan = plan_merges(threshold_merges(edges, 0.5), edges.dst, lengths, n)
    assert plan.changed.tolist() == [True, False, True, False]  # merged rows and identity rows
    spread = _spread_padding(plan.target, n)
    got_x, got_size, _ = apply_plan(plan, x, size, pos, n)
    for b in range(bsz):
        new_len = int(plan.new_lengths[b])
        padding = spread[b][~real[b]].tolist()
        assert len(set(padding)) == len(padding) and all(new_len <= slot < n for slot in padding)
        assert float(got_x[b, :new_len].abs().max()) < 100, "padding leaked into a real slot"
        assert torch.equal(got_size[b, new_len:], torch.zeros(n - new_len))
        if plan.changed[b]:
            assert torch.equal(got_x[b, new_len:], torch.zeros(n - new_len, dim))
