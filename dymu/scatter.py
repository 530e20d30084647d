"""Group reductions in pure torch: the "scatter fix".

torch-scatter has no PyPI wheels, and `Tensor.scatter_add_` needs an index with the
full shape of `src`, which is the shape error the DyMU reference hit on
(B, N, H, d) / (B, H, N, d) layouts. Here the index is always 1-D along `dim` and
broadcast over every other dim (`index_add_` semantics), so any layout works.

`deterministic=True` uses a normalised assignment-matrix matmul instead of
`index_add_` (whose CUDA atomics make float sums order-dependent).
"""

from __future__ import annotations

import torch

__all__ = ["assignment", "group_count", "group_mean", "group_sum"]


def _check_index(src: torch.Tensor, index: torch.Tensor, dim: int) -> int:
    dim = dim % src.dim()
    if index.dim() != 1 or index.numel() != src.shape[dim]:
        raise ValueError(
            f"index must be 1-D with length src.shape[{dim}]={src.shape[dim]}, got shape {tuple(index.shape)}"
        )
    return dim


def group_count(index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Members per group, as a long tensor of length `num_groups` (every id < `num_groups`).

    An integer `index_add_` rather than `bincount`: on CUDA bincount reads the largest id back
    to the host, which a CUDA graph capture refuses; integer sums are exact in any order."""
    counts = torch.zeros(num_groups, dtype=torch.long, device=index.device)
    return counts.index_add_(0, index, torch.ones_like(index, dtype=torch.long))


def _assignment_matmul(
    src: torch.Tensor, index: torch.Tensor, num_groups: int, dim: int, weights: torch.Tensor
) -> torch.Tensor:
    # (G, N) matrix with weights[i] at [index[i], i]; matmul has a fixed reduction order.
    n = index.numel()
    assign = torch.zeros(num_groups, n, dtype=src.dtype, device=src.device)
    assign[index, torch.arange(n, device=src.device)] = weights.to(src.dtype)
    moved = src.movedim(dim, -1)
    return (moved @ assign.T).movedim(-1, dim)


def group_sum(
    src: torch.Tensor, index: torch.Tensor, num_groups: int, dim: int = 0, deterministic: bool = False
) -> torch.Tensor:
    """Sum slices of `src` along `dim` that share a group id; empty groups are zero."""
    dim = _check_index(src, index, dim)
    if deterministic:
        ones = torch.ones(index.numel(), dtype=src.dtype, device=src.device)
        return _assignment_matmul(src, index, num_groups, dim, ones)
    shape = list(src.shape)
    shape[dim] = num_groups
    out = torch.zeros(shape, dtype=src.dtype, device=src.device)
    return out.index_add_(dim, index, src)


def group_mean(
    src: torch.Tensor, index: torch.Tensor, num_groups: int, dim: int = 0, deterministic: bool = False
) -> torch.Tensor:
    """Mean of slices of `src` along `dim` per group id (VTU's remerge); empty groups are zero."""
    dim = _check_index(src, index, dim)
    counts = group_count(index, num_groups).clamp_min(1)
    if deterministic:
        return _assignment_matmul(src, index, num_groups, dim, 1.0 / counts[index].to(torch.float64))
    summed = group_sum(src, index, num_groups, dim)
    view = [1] * src.dim()
    view[dim] = num_groups
    return summed / counts.view(view).to(summed.dtype)


def assignment(index: torch.Tensor, num_groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Batched 0/1 assignment (B, G, N) for a (B, N) group index: `bmm(assignment, y)` sums each
    group's rows in a fixed reduction order (the deterministic remerge)."""
    bsz, n = index.shape
    out = torch.zeros(bsz, num_groups, n, dtype=dtype, device=index.device)
    return out.scatter_(1, index[:, None, :], 1.0)
