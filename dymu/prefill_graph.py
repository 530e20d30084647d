"""The VTU prefill replayed as a CUDA graph: at batch 1 it is launch-bound (32 layers of dozens of
small kernels each, about 34 ms on an H200 for a 7B model whose GEMMs need a few ms).

A graph needs fixed shapes, and two sizes change with every sample: the merged-row count N_u (with
the image) and the virtual length N (with the prompt). Both are padded to a multiple of `BUCKET` so
one captured graph serves every sample in its bucket:

- extra merged rows go first and are zero; no real position reads them (padded positions read
  row 0, a zero row);
- extra virtual positions go last, after every real one: causal attention keeps them out of every
  real query, so the real positions' attention, keys and values are those of the unpadded prefill,
  and a real position p is written at p, where a decode buffer wants it.

The keys and values go into a sink: the graph decode's own buffer where the caller passes one (no
second KV cache, no copy; `generation.prepare`), else one buffer per (batch, padded N) that every
graph of that shape shares, whose contents the caller gets as copies (or borrowed views).
Off-GPU the same padded computation runs eagerly (what the CPU tests compare with `vtu_prefill`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch import nn

from .cuda_graph import GraphCache
from .options import DEFAULT, Options
from .vtu import KVSink, VtuOutput, default_positions, head_dim, vtu_prefill

BUCKET = 64  # rows and virtual length; at batch 1 the GEMMs are weight-bound, so 64 extra rows cost little
_MAX_GRAPHS = 64  # per decoder: (row buckets) x (virtual-length buckets) seen in a run
_MAX_BUFFERS = 2  # per decoder: K/V buffers of distinct (batch, padded N); each is a full KV cache


class _DecoderGraphs:
    def __init__(self) -> None:
        self.graphs = GraphCache(limit=_MAX_GRAPHS)
        self.buffers: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.replays = 0  # graph prefills run so far: a borrowed output is current until the next one
        self.sink_key: tuple | None = None

    def buffer(self, key: tuple, make) -> torch.Tensor:
        """The shared K/V buffer for one (batch, padded N) shape; evicting one drops its graphs."""
        if key not in self.buffers:
            self.buffers[key] = make()
            while len(self.buffers) > _MAX_BUFFERS:
                old, _ = self.buffers.popitem(last=False)
                self.graphs.drop(lambda call_key, old=old: call_key[0] == old)
        self.buffers.move_to_end(key)
        return self.buffers[key]

    def adopt_sink(self, key: tuple) -> None:
        """Prefill into a new sink: the graphs that wrote into the last one go (its memory may be
        freed and reused by now; a graph writes raw addresses)."""
        if key != self.sink_key:
            old, self.sink_key = self.sink_key, key
            self.graphs.drop(lambda call_key: call_key[0] == old)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int, int]:
    """Pad rows (in front) and virtual positions (at the end) to `BUCKET` multiples; returns the
    padded inputs and the two pad widths. No mask stays no mask: plain causal attention already
    keeps the padding, which comes last, out of every real query."""
    rows_bsz, n_u, dim = merged.shape  # 1 for packed rows (vtu_prefill)
    bsz, n = idx.shape
    pad_u, pad_n = bucket_spare(n_u), bucket_spare(n)
    merged_p = torch.cat([merged.new_zeros(rows_bsz, pad_u, dim), merged], dim=1)
    idx_p = torch.cat([idx + pad_u, idx.new_zeros(bsz, pad_n)], dim=1)  # padding reads zero row 0
    positions_p = torch.cat([positions, positions.new_zeros(bsz, pad_n)], dim=1)
    mask_p = None
    if mask is not None:
        total = n + pad_n
        mask_p = torch.full((bsz, 1, total, total), torch.finfo(mask.dtype).min, dtype=mask.dtype,
                            device=mask.device)  # fmt: skip
        mask_p[..., :n, :n] = mask
        padded = torch.arange(n, total, device=mask.device)
        mask_p[:, :, padded, padded] = 0.0  # padded rows see themselves: no fully masked row
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
    sink: KVSink | None = None,
) -> VtuOutput:
    """`vtu_prefill` with the same arguments, replayed from a CUDA graph per padded shape (eager
    off-GPU, or where capture fails: then with one warning).

    `sink` (a decode buffer, as for `vtu_prefill`, at least the padded length long) receives the
    keys and values, and the output's are views of it: its owner says when they are overwritten.
    Without one they go into this module's shared buffer and come back as copies, or with
    `borrow=True` as views of it (for a caller that copies them into its decode cache before the
    next prefill; the copies are a full KV cache: 350 MB for a 7B model at batch 1); the output's
    `current()` turns False once a later prefill overwrote them."""
    positions = default_positions(idx) if positions is None else positions
    merged_p, idx_p, positions_p, mask_p, pad_u, pad_n = pad_inputs(merged_embeds, idx, positions, mask)
    bsz, total = idx_p.shape
    n = total - pad_n
    state = _decoders.setdefault(decoder, _DecoderGraphs())
    if sink is None:
        config = decoder.config
        shape = (len(decoder.layers), 2, bsz, config.num_key_value_heads, total, head_dim(config))
        buffer_key: tuple = ("own", shape, merged_p.dtype, str(merged_p.device))
        kv = state.buffer(buffer_key, lambda: merged_p.new_empty(shape))
        target = (kv[:, 0], kv[:, 1])
    else:
        keys, values = sink
        buffer_key = ("sink", keys.data_ptr(), values.data_ptr(), tuple(keys.shape), str(keys.device))
        state.adopt_sink(buffer_key)
        target = sink

    def fn(merged: torch.Tensor, index: torch.Tensor, pos: torch.Tensor, *add_mask: torch.Tensor):
        out = vtu_prefill(decoder, merged, index, rope_theta, pos, *add_mask, options=options, sink=target)
        return (out.hidden,)

    inputs = (merged_p, idx_p, positions_p) + (() if mask_p is None else (mask_p,))
    call_key = (buffer_key, total, tuple(merged_p.shape), mask_p is not None, rope_theta, options)
    outputs = state.graphs.call(call_key, fn, inputs)
    if outputs is None:  # capture failed: the plain prefill
        return vtu_prefill(decoder, merged_embeds, idx, rope_theta, positions, mask, options, sink)
    state.replays += 1
    keys, values = (t[:, :, :, :n] for t in target)
    hidden = outputs[0][:, pad_u:]
    if sink is not None:  # the sink's owner says when its keys and values are overwritten
        return VtuOutput(hidden.clone(), list(keys.unbind(0)), list(values.unbind(0)))
    if borrow:
        stamp = state.replays
        current = lambda: state.replays == stamp  # noqa: E731 - a one-line check
    else:
        keys, values, hidden, current = keys.clone(), values.clone(), hidden.clone(), None
    return VtuOutput(hidden, list(keys.unbind(0)), list(values.unbind(0)), current)
