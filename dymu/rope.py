"""Rotary position embeddings in HF's rotate-half convention (pure tensor math).

VTU applies RoPE itself, at the virtual positions, so these are written once here instead of
borrowed from a transformers version's attention module.
"""

from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """cos/sin (B, N, 1, dim) at integer `positions` (B, N), computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, :, None].to(dtype), emb.sin()[:, :, None].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, H, d) rotated by (B, N, 1, d) tables."""
    return x * cos + rotate_half(x) * sin


def half_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, 1, hd) cos/sin -> contiguous float32 (B*N, hd/2): the two halves are equal."""
    half = cos.shape[-1] // 2
    return (cos[..., 0, :half].float().contiguous().view(-1, half),
            sin[..., 0, :half].float().contiguous().view(-1, half))  # fmt: skip
