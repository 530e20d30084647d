"""The VTU prefill replayed as a CUDA graph: at batch 1 it is launch-bound (32 layers of dozens of
small kernels each, about 34 ms on an H200 for a 7B model whose GEMMs need a few ms).

A graph needs fixed shapes, and two sizes change with every sample: the merged-row count N_u (with
the image) and the virtual length N (with the prompt). Both are padded on the left to a multiple of
`BUCKET` so one captured graph serves every sample in its bucket:

- extra merged rows are zero and no virtual position reads them (virtual padding reads row 0,
  which `generation.prepare` always leaves as a zero dump row);
- extra virtual positions are masked as keys for every query and see only themselves, so the
  real positions' attention, keys and values are those of the unpadded prefill.

The keys and values are written into one buffer per (batch, padded N) that every graph of that
shape shares; the caller gets copies, so a later replay cannot change a cache it already holds.
Off-GPU the same padded computation runs eagerly (what the CPU tests compare with `vtu_prefill`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch import nn

from .cuda_graph import GraphCache
from .options import DEFAULT, Options
from .vtu import VtuOutput, additive_mask, default_positions, head_dim, vtu_prefill

BUCKET = 64  # rows and virtual length; at batch 1 the GEMMs are weight-bound, so 64 extra rows cost little
_MAX_GRAPHS = 64  # per decoder: (row buckets) x (virtual-length buckets) seen in a run
_MAX_BUFFERS = 2  # per decoder: K/V buffers of distinct (batch, padded N); each is a full KV cache


class _DecoderGraphs:
    def __init__(self) -> None:
        self.graphs = GraphCache(limit=_MAX_GRAPHS)
        self.buffers: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.replays = 0  # graph prefills run so far: a borrowed output is current until the next one

    def buffer(self, key: tuple, make) -> torch.Tensor:
        """The shared K/V buffer for one (batch, padded N) shape; evicting one drops its graphs."""
        if key not in self.buffers:
            self.buffers[key] = make()
            while len(self.buffers) > _MAX_BUFFERS:
                old, _ = self.buffers.popitem(last=False)
                self.graphs.drop(lambda call_key, old=old: call_key[0] == old)
        self.buffers.move_to_end(key)
        return self.buffers[key]


_decoders: weakref.WeakKeyDictionary[nn.Module, _DecoderGraphs] = weakref.WeakKeyDictionary()


def capture_count(decoder: nn.Module) -> int:
    """Prefill graphs captured so far for a decoder (a benchmark reports captures inside timed samples)."""
    state = _decoders.get(decoder)
    return state.graphs.captures if state is not None else 0


def bucket_spare(n: int) -> int:
    """Rows (or positions) that round `n` up to a multiple of `BUCKET`: every padded shape this
    module and `generation.prepare` make comes from here."""
    return -n % BUCKET


def pad_inputs(
    merged: torch.Tensor, idx: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Left-pad rows and virtual positions to `BUCKET` multiples; returns the padded inputs (the
    mask always explicit) and the two pad widths."""
    rows_bsz, n_u, dim = merged.shape  # 1 for packed rows (vtu_prefill)
    bsz, n = idx.shape
    pad_u, pad_n = bucket_spare(n_u), bucket_spare(n)
    merged_p = torch.cat([merged.new_zeros(rows_bsz, pad_u, dim), merged], dim=1)
    idx_p = torch.cat([idx.new_zeros(bsz, pad_n), idx + pad_u], dim=1)  # padding reads zero row 0
    positions_p = torch.cat([positions.new_zeros(bsz, pad_n), positions], dim=1)
    total = n + pad_n
    if mask is None:
        causal = torch.ones(total, total, dtype=torch.bool, device=idx.device).tril()
        valid = torch.arange(total, device=idx.device) >= pad_n
        mask_p = additive_mask(
            (causal & valid[None, :])[None, None].expand(bsz, 1, total, total), merged.dtype
        )
    else:
        floor = torch.finfo(mask.dtype).min
        mask_p = torch.full((bsz, 1, total, total), floor, dtype=mask.dtype, device=mask.device)
        mask_p[..., pad_n:, pad_n:] = mask
        diagonal = torch.arange(pad_n, device=mask.device)
        mask_p[:, :, diagonal, diagonal] = 0.0  # padded rows see themselves: no fully masked row
    return merged_p, idx_p, positions_p, mask_p, pad_u, pad_n


@torch.no_grad()
def graphed_vtu_prefill(
    decoder: nn.Module,
    merged_embeds: torch.Tensor,
    idx: torch.Tensor,
    rope_theta: float,
    positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    options: Options = DEFAULT,
    borrow: bool = False,
) -> VtuOutput:
    """`vtu_prefill` with the same arguments, replayed from a CUDA graph per padded shape (eager
    off-GPU, or where capture fails: then with one warning).

    `borrow=True` returns views of the shared K/V buffer instead of copies, for a caller that copies
    them into its decode cache before the next prefill (the copies are a full KV cache: 350 MB for a
    7B model at batch 1); the output's `current()` turns False once a later prefill overwrote them."""
    positions = default_positions(idx) if positions is None else positions
    merged_p, idx_p, positions_p, mask_p, pad_u, pad_n = pad_inputs(merged_embeds, idx, positions, mask)
    config = decoder.config
    layers = len(decoder.layers)
    bsz, total = idx_p.shape
    shape = (layers, 2, bsz, config.num_key_value_heads, total, head_dim(config))
    state = _decoders.setdefault(decoder, _DecoderGraphs())
    buffer_key = (shape, merged_p.dtype, str(merged_p.device))
    kv = state.buffer(buffer_key, lambda: merged_p.new_empty(shape))

    def fn(merged: torch.Tensor, index: torch.Tensor, pos: torch.Tensor, add_mask: torch.Tensor):
        out = vtu_prefill(decoder, merged, index, rope_theta, pos, add_mask, options)
        for i, (k, v) in enumerate(zip(out.keys, out.values, strict=True)):
            kv[i, 0].copy_(k)
            kv[i, 1].copy_(v)
        return (out.hidden,)

    inputs = (merged_p, idx_p, positions_p, mask_p)
    call_key = (buffer_key, tuple(merged_p.shape), rope_theta, options)
    outputs = state.graphs.call(call_key, fn, inputs)
    if outputs is None:  # capture failed: the plain prefill
        return vtu_prefill(decoder, merged_embeds, idx, rope_theta, positions, mask, options)
    state.replays += 1
    kept, hidden, stamp = kv[..., pad_n:, :], outputs[0][:, pad_u:], state.replays
    if borrow:
        current = lambda: state.replays == stamp  # noqa: E731 - a one-line check
    else:
        kept, hidden, current = kept.clone(), hidden.clone(), None
    return VtuOutput(hidden, list(kept[:, 0].unbind(0)), list(kept[:, 1].unbind(0)), current)
