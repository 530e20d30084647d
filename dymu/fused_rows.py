"""A Llama decoder layer's row-wise chain (residual add + RMSNorm, SiLU(gate) * up) as Triton kernels.

Why: in a decode step every layer runs about 37 kernels, and two RMSNorms (float cast, square,
mean, rsqrt, two products, casts) plus the residual adds and the MLP's activation are most of
them; at batch 8 on an H100 the small kernels took about 2.5 ms of a 10 ms step
(reports/gpu/bench/h100_profile_decode_step_and_prefill_b8.txt). Here each norm, with the
residual add before it, is one kernel, and SiLU(gate) * up another. They round where the module
code rounds (the sum to the model dtype, the normalised row to the model dtype before the weight,
the activation before the product), so only the float32 sum order differs.

`DecoderRows(fused=False)`, or any model these kernels do not describe (another norm class,
another activation, mixed dtypes), calls the modules themselves: the plain path, which the CPU
tests compare with (the kernels themselves run there in Triton's interpreter).
Off with `Options(fused_rows=False)`.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

# norms whose forward is weight * (x * rsqrt(mean(x^2) + eps)).to(dtype), in float32 inside
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})
SILU = frozenset({"SiLU", "SiLUActivation"})


@functools.cache
def _kernels():
    import triton  # noqa: PLC0415 - optional dependency
    import triton.language as tl  # noqa: PLC0415 - optional dependency

    @triton.jit
    def add_rms_norm(x, add, weight, out, summed, dim, eps, BLOCK: tl.constexpr, ADD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        keep = cols < dim
        v = tl.load(x + row * dim + cols, mask=keep, other=0.0)
        if ADD:  # the residual sum, rounded to the model dtype as `x + y` rounds it
            v = v.to(tl.float32) + tl.load(add + row * dim + cols, mask=keep, other=0.0).to(tl.float32)
            v = v.to(out.dtype.element_ty)
            tl.store(summed + row * dim + cols, v, mask=keep)
        vf = v.to(tl.float32)
        scale = 1.0 / tl.sqrt(tl.sum(vf * vf, axis=0) / dim + eps)
        normed = (vf * scale).to(out.dtype.element_ty).to(tl.float32)
        w = tl.load(weight + cols, mask=keep, other=0.0).to(tl.float32)
        tl.store(out + row * dim + cols, (w * normed).to(out.dtype.element_ty), mask=keep)

    @triton.jit
    def silu_mul(gate, up, out, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = i < n
        g = tl.load(gate + i, mask=keep, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(out.dtype.element_ty).to(tl.float32)
        u = tl.load(up + i, mask=keep, other=0.0).to(tl.float32)
        tl.store(out + i, (act * u).to(out.dtype.element_ty), mask=keep)

    return add_rms_norm, silu_mul


def add_rms_norm(x: torch.Tensor, add: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(x + add, rms_norm(x + add) * weight) in one kernel (`add=None`: x itself, and its norm)."""
    dim = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if add is not None else x
    block = 1 << (dim - 1).bit_length()
    _kernels()[0][(x.numel() // dim,)](
        x, add.contiguous() if add is not None else x, weight, out, summed, dim, eps,
        BLOCK=block, ADD=add is not None, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return summed, out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, each rounded to the dtype as the module code rounds them."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    block = 1024
    _kernels()[1][(-(-gate.numel() // block),)](gate, up, out, gate.numel(), BLOCK=block)
    return out


def _norm_eps(norm: nn.Module) -> float | None:
    """The epsilon of an RMSNorm these kernels reproduce, else None."""
    if type(norm).__name__ not in RMS_NORMS:
        return None
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


class DecoderRows:
    """The row-wise ops a decoder layer runs, fused where `enabled` and the model allows it."""

    def __init__(self, fused: bool) -> None:
        self.fused = fused  # the caller decides: `devices.kernels_run_on` and the option

    def norm(self, norm: nn.Module, x: torch.Tensor, add: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(x + add, norm(x + add)); `add=None` norms x as it is."""
        eps = _norm_eps(norm) if self.fused else None
        weight = getattr(norm, "weight", None)
        if eps is None or weight is None or weight.dtype != x.dtype:
            if add is not None:
                x = x + add
            return x, norm(x)
        return add_rms_norm(x, add, weight, eps)

    def mlp(self, mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """down(act(gate(h)) * up(h)) with act * up as one kernel where act is SiLU; else mlp(h)."""
        parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")]
        if not self.fused or any(p is None for p in parts) or type(parts[3]).__name__ not in SILU:
            return mlp(h)
        gate, up, down, _ = parts
        return down(silu_mul(gate(h), up(h)))
