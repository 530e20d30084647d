"""VTU's full-length step as one Triton kernel on CUDA: gather each virtual row from its merged
row, apply RoPE at the virtual position, and write head-major (B, H, N, hd) for SDPA and the
cache. The torch path does the same in about six passes over the full-length tensor (gather,
rotate-half cat, two products, a sum, a transpose copy); this does one read of the small
merged tensor and one write. Off with `Options(fused_rope=False)`; CPU always takes the torch path.
"""

from __future__ import annotations

import functools

import torch

from .devices import kernels_run_on


@functools.cache
def _kernel():
    import triton  # noqa: PLC0415 - optional dependency
    import triton.language as tl  # noqa: PLC0415 - optional dependency

    @triton.jit
    def expand_rope(src, flat, cos, sin, out, n, heads, stride_b, stride_h, stride_n, HD: tl.constexpr,
                    HALF: tl.constexpr, BLOCK_H: tl.constexpr, ROPE: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)  # one virtual row (b, j) of B*N
        b = row // n
        j = row % n
        merged = tl.load(flat + row).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, HALF)[None, :]
        keep = h < heads
        base = src + merged * heads * HD + h * HD + d
        x1 = tl.load(base, mask=keep).to(tl.float32)
        x2 = tl.load(base + HALF, mask=keep).to(tl.float32)
        if ROPE:  # HF rotate-half: out = x*cos + cat(-x2, x1)*sin, with cos/sin halves equal
            c = tl.load(cos + row * HALF + d)
            s = tl.load(sin + row * HALF + d)
            x1, x2 = x1 * c - x2 * s, x2 * c + x1 * s
        dest = out + (b.to(tl.int64) * stride_b + h * stride_h + j.to(tl.int64) * stride_n) + d
        tl.store(dest, x1.to(out.dtype.element_ty), mask=keep)
        tl.store(dest + HALF, x2.to(out.dtype.element_ty), mask=keep)

    return expand_rope


def fused_available(x: torch.Tensor, head_dim: int) -> bool:
    """Whether the Triton kernel can run for `x` (CUDA, Triton importable, a power-of-two half head)."""
    half = head_dim // 2
    return not (half & (half - 1) or head_dim % 2) and kernels_run_on(x)


def expand_rope(x: torch.Tensor, flat: torch.Tensor, n: int, cos_half: torch.Tensor | None,
                sin_half: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(B, N_u, H, hd) merged rows (or packed (1, T, H, hd)) -> (B, H, N, hd) virtual rows, RoPE'd
    where tables are given.

    `flat` (B*N,) indexes rows of x viewed as (B*N_u, H, hd) (or (T, H, hd)), as `Remerger.flat` does.
    `out` is where to write (any (B, H, N, hd) view whose last dimension is contiguous, e.g. the
    first N positions of a decode buffer); by default a new contiguous tensor.
    """
    heads, hd = x.shape[2:]
    bsz = flat.numel() // n
    x = x.contiguous()
    if out is None:
        out = torch.empty(bsz, heads, n, hd, dtype=x.dtype, device=x.device)
    elif out.shape != (bsz, heads, n, hd) or out.stride(-1) != 1 or out.dtype != x.dtype:
        raise ValueError(f"out must be a ({bsz}, {heads}, {n}, {hd}) {x.dtype} view with a contiguous last "
                         f"dimension, not {tuple(out.shape)} {out.dtype} with strides {out.stride()}")  # fmt: skip
    rope = cos_half is not None
    dummy = out if not rope else None
    _kernel()[(bsz * n,)](
        x, flat, cos_half if rope else dummy, sin_half if rope else dummy, out, n, heads, *out.stride()[:3],
        HD=hd, HALF=hd // 2, BLOCK_H=max(1, 1 << (heads - 1).bit_length()), ROPE=rope,
    )  # fmt: skip
    return out
