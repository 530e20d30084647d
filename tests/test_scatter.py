"""Scatter ops: group sum/mean with a 1-D index on any dim (the seed's scatter fix)."""

from __future__ import annotations

import pytest
import torch

from dymu.scatter import group_count, group_mean, group_sum


def naive_group(src: torch.Tensor, index: torch.Tensor, groups: int, dim: int, mean: bool) -> torch.Tensor:
    moved = src.movedim(dim, 0)
    out = torch.zeros((groups, *moved.shape[1:]), dtype=src.dtype)
    for g in range(groups):
        members = [moved[i] for i in range(len(index)) if int(index[i]) == g]
        if members:
            stacked = torch.stack(members)
            out[g] = stacked.mean(0) if mean else stacked.sum(0)
    return out.movedim(0, dim)


LAYOUTS = {"BNHd-dim1": ((2, 9, 3, 4), 1), "BHNd-dim2": ((2, 3, 9, 4), 2), "Nd-dim0": ((9, 5), 0)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("mean", [False, True])
def test_group_ops_match_naive_loop(layout: str, deterministic: bool, mean: bool) -> None:
    shape, dim = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(shape, generator=gen, dtype=torch.float64)
    index = torch.tensor([0, 2, 2, 5, 0, 1, 5, 5, 2])  # group 3 and 4 empty
    fn = group_mean if mean else group_sum
    got = fn(src, index, 6, dim=dim, deterministic=deterministic)
    want = naive_group(src, index, 6, dim, mean)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)
    assert got.select(dim, 3).abs().max() == 0


def test_remerge_inverts_expand() -> None:
    """T1: remerge(x[idx]) == x for a surjective idx."""
    x = torch.randn(2, 4, 7, 8)
    idx = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 6])
    expanded = x.index_select(2, idx)
    torch.testing.assert_close(group_mean(expanded, idx, 7, dim=2), x)
    torch.testing.assert_close(group_mean(expanded, idx, 7, dim=2, deterministic=True), x)


def test_counts_and_bad_index() -> None:
    assert group_count(torch.tensor([0, 0, 2]), 4).tolist() == [2, 0, 1, 0]
    with pytest.raises(ValueError, match="1-D"):
        group_sum(torch.zeros(2, 5, 3), torch.zeros(4, dtype=torch.long), 3, dim=1)


def test_plain_scatter_add_fails_on_these_layouts() -> None:
    """Negative control: the naive scatter_add_ call the reference used breaks on (B, N, H, d)."""
    src = torch.randn(2, 9, 3, 4)
    index = torch.tensor([0, 2, 2, 5, 0, 1, 5, 5, 2])
    with pytest.raises(RuntimeError):
        torch.zeros(2, 6, 3, 4).scatter_add_(1, index, src)


@pytest.mark.parametrize("deterministic", [False, True])
def test_float64_results_are_float64_exact_and_dim_defaults_to_0(deterministic: bool) -> None:
    """No step rounds through float32 (the mean's 1/count weights included), and a 2-D call
    without `dim` groups rows."""
    src = torch.randn(9, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    index = torch.tensor([0, 2, 2, 5, 0, 1, 5, 5, 2])
    for fn, mean in ((group_sum, False), (group_mean, True)):
        got = fn(src, index, 6, deterministic=deterministic)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, naive_group(src, index, 6, 0, mean), rtol=1e-13, atol=1e-13)
