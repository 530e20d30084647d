"""Group means of rows as one Triton kernel over a sorted member list (VTU's remerge on CUDA).

Why: the plain remerge casts the full-length attention output to float32, `index_add_`s it
(float atomics) and scales it back: four passes over the largest tensor of the prefill, about
10 ms of a 62 ms batch-8 prefill of a 7B model on an H100
(reports/gpu/bench/h100_profile_decode_step_and_prefill_b8.txt). Here each group's rows are
listed once per prefill (`Segments`: member rows sorted by group, with offsets), and one kernel
reads every row once in the model dtype, sums in float32 registers in a fixed order and writes
the mean: no float32 copy, no atomics, and the same sums on every run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@functools.cache
def _kernel():
    import triton  # noqa: PLC0415 - optional dependency
    import triton.language as tl  # noqa: PLC0415 - optional dependency

    @triton.jit
    def segment_mean(src, members, offsets, scale, out, dim, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        group = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = cols < dim
        first = tl.load(offsets + group)
        stop = tl.load(offsets + group + 1)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        # CHUNK member rows per step: a tile, not a row (a while loop: Triton 3.6's interpreter cannot
        # take a loaded scalar as a `range` bound)
        while first < stop:
            at = first + tl.arange(0, CHUNK)
            present = at < stop
            rows = tl.load(members + at, mask=present, other=0).to(tl.int64)
            tile = tl.load(src + rows[:, None] * dim + cols[None, :], mask=present[:, None] & keep[None, :],
                           other=0.0)  # fmt: skip
            acc += tl.sum(tile.to(tl.float32), axis=0)
            first += CHUNK
        mean = acc * tl.load(scale + group)
        tl.store(out + group * dim + cols, mean.to(out.dtype.element_ty), mask=keep)

    return segment_mean


@dataclass(frozen=True)
class Segments:
    """Members of each of `groups` groups: `members` (R,) row ids sorted by group, `offsets`
    (groups + 1,) where each group's run starts, `scale` (groups,) float32 1 / max(count, 1)."""

    members: torch.Tensor
    offsets: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def of(cls, index: torch.Tensor, counts: torch.Tensor) -> Segments:
        """From a (R,) group id per row and the (groups,) member counts (no host sync)."""
        members = torch.sort(index, stable=True).indices
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(members, offsets, 1.0 / counts.float().clamp_min(1.0))


def segment_mean(
    src: torch.Tensor, segments: Segments, chunk: int = 32, block: int = 128, warps: int = 2
) -> torch.Tensor:
    """(R, D) rows -> (groups, D) means in `src`'s dtype (float32 sums; an empty group is 0).

    One program per (group, `block` columns) walks its group `chunk` members at a time. The defaults
    won a sweep of chunk x block x warps on an H100 over a real batch-8 mapping (mostly one-row
    text groups, a few image groups of dozens to hundreds of rows): 112 us a layer, against 124 us
    for the earlier 64 x 64 x 4 and 273 us for float32 `index_add_`
    (reports/gpu/h100_segment_mean_sweep.json)."""
    src = src.contiguous()
    groups, dim = segments.scale.numel(), src.shape[-1]
    out = torch.empty(groups, dim, dtype=src.dtype, device=src.device)
    block = min(block, 1 << (dim - 1).bit_length())
    _kernel()[(groups, -(-dim // block))](
        src,
        segments.members,
        segments.offsets,
        segments.scale,
        out,
        dim,
        CHUNK=chunk,
        BLOCK=block,
        num_warps=warps,
    )
    return out
