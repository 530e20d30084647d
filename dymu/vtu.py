"""Virtual token unmerging (fast VTU) for a Llama decoder stack (docs/algorithm.md section 3).

Row-wise work (norms, q/k/v/o projections, MLP) runs on the N_u merged rows; attention runs
at the virtual length N (text + 576 image positions) after expanding q/k/v with `idx` and
applying RoPE at the virtual positions, then its output is remerged (group mean) back to
N_u rows. Written against stable module attributes (`layers[i].{input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp}`, `norm`, `config`) and torch SDPA.

Pure with respect to versions: the caller hands in the attention mask (built through the
installed transformers' own masking API) and the RoPE base; this module returns plain
per-layer (key, value) tensors at length N, which the caller puts into a cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .devices import kernels_run_on
from .expand_rope import expand_rope, fused_available
from .fused_rows import DecoderRows
from .options import DEFAULT, Options
from .rope import apply_rope, half_tables, rope_cos_sin
from .scatter import assignment, group_count, group_sum
from .segment_mean import Segments, segment_mean


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


class Remerger:
    """M·e (expand) and P·y (remerge) for one fixed mapping, built once per prefill and shared
    by every layer.

    Merged rows are padded (B, N_u, ...) with `idx` local to each sample, or packed (1, T, ...):
    every sample's rows one after another (no padding rows for the GEMMs to run on), with `idx`
    indexing that global row list (`packed=True`).
    Expand is a row gather. Remerge sums in float32 (`scatter.group_sum`) and scales by
    1/count; `fused=True` (CUDA) is the same mean as one Triton kernel (`segment_mean`: float32
    sums in a fixed order, no float32 copy of `y`); `deterministic=True` uses a 0/1
    assignment-matrix bmm instead (fixed reduction order, no CUDA atomics; measured slower on
    H200; padded rows only).
    """

    def __init__(self, idx: torch.Tensor, n_u: int, dtype: torch.dtype, deterministic: bool = False,
                 packed: bool = False, fused: bool = False) -> None:  # fmt: skip
        bsz, n = idx.shape
        if packed and deterministic:
            raise ValueError("the deterministic remerge needs padded rows (B, N_u, D), not packed ones")
        self.bsz, self.n_u, self.n, self.deterministic = bsz, n_u, n, deterministic
        self.rows = n_u if packed else bsz * n_u
        self.merged_shape = (1, n_u) if packed else (bsz, n_u)
        self.flat = (idx if packed else idx + torch.arange(bsz, device=idx.device)[:, None] * n_u).flatten()
        counts = group_count(self.flat, self.rows)
        self.assign = assignment(idx, n_u, dtype) if deterministic else None
        # the Triton segment mean (CUDA): each merged row's virtual rows listed once for every layer
        self.segments = Segments.of(self.flat, counts) if fused and not deterministic else None
        self.inv_count = None  # the torch paths' 1/count (the segment mean scales by its own)
        if self.segments is None:
            self.inv_count = 1.0 / counts.view(*self.merged_shape, 1).float().clamp_min(1.0)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N_u, ...) or packed (1, T, ...) -> (B, N, ...): each virtual row copies its merged row."""
        rows = x.reshape(self.rows, *x.shape[2:]).index_select(0, self.flat)
        return rows.view(self.bsz, self.n, *x.shape[2:])

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N_u, D) or packed (1, T, D): the mean of each merged row's virtual rows."""
        dim = y.shape[-1]
        if self.segments is not None:
            return segment_mean(y.reshape(self.bsz * self.n, dim), self.segments).view(
                *self.merged_shape, dim
            )
        if self.assign is not None:
            summed = torch.bmm(self.assign, y).float()
        else:
            summed = group_sum(y.reshape(self.bsz * self.n, dim).float(), self.flat, self.rows)
            summed = summed.view(*self.merged_shape, dim)
        return (summed * self.inv_count).to(y.dtype)


@dataclass
class VtuOutput:
    """Final-norm hidden states on merged rows, and per-layer post-RoPE (K, V) at length N."""

    hidden: torch.Tensor  # (B, N_u, D)
    keys: list[torch.Tensor]  # (B, H_kv, N, hd) each
    values: list[torch.Tensor]
    current: Callable[[], bool] | None = None  # borrowed tensors: False once something overwrote them


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, N, N) "may attend" booleans -> an additive SDPA mask. Each row also sees itself,
    so no row is fully masked (padded rows' outputs only reach the dump row)."""
    n = allowed.shape[-1]
    allowed = allowed | torch.eye(n, dtype=torch.bool, device=allowed.device)[None, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class Rope:
    """RoPE tables at the virtual positions, in the form the expand path wants."""

    cos: torch.Tensor
    sin: torch.Tensor
    fused: bool  # True: float32 (B*N, hd/2) halves for the Triton kernel; False: (B, N, 1, hd)


def _to_virtual(x: torch.Tensor, remerge: Remerger, heads: int, hd: int, rope: Rope, with_rope: bool,
                out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(B, N_u, heads*hd) merged projections -> (B, heads, N, hd) at the virtual rows (written into
    `out` if given: the kernel writes there directly, the torch path copies)."""
    x = x.view(x.shape[0], -1, heads, hd)
    if rope.fused:
        tables = (rope.cos, rope.sin) if with_rope else (None, None)
        return expand_rope(x, remerge.flat, remerge.n, *tables, out=out)
    x = remerge.expand(x)
    if with_rope:
        x = apply_rope(x, rope.cos, rope.sin)
    return x.transpose(1, 2) if out is None else out.copy_(x.transpose(1, 2))


def repeat_heads(x: torch.Tensor, rep: int) -> torch.Tensor:
    """(B, H_kv, N, hd) -> (B, H_kv * rep, N, hd), each KV head repeated for its query group
    (`repeat_interleave` on dim 1, written as expand + reshape: no host sync, so capturable)."""
    bsz, kv_heads, n, hd = x.shape
    return x[:, :, None].expand(bsz, kv_heads, rep, n, hd).reshape(bsz, kv_heads * rep, n, hd)


def _layer(layer: nn.Module, x, pending, rope: Rope, mask, config, remerge: Remerger, rows: DecoderRows,
           k_out: torch.Tensor | None = None, v_out: torch.Tensor | None = None):  # fmt: skip
    """One decoder layer; `pending` is the previous layer's MLP output, not yet added to `x` (so the
    add and this layer's norm can be one kernel). Returns (x, this layer's MLP output, k, v); k and
    v are written into `k_out` / `v_out` where given."""
    attn = layer.self_attn
    bsz = remerge.bsz
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, head_dim(config)
    x, h = rows.norm(layer.input_layernorm, x, pending)
    # projections on the N_u merged rows; then gather to the N virtual rows (+ RoPE there)
    q = _to_virtual(attn.q_proj(h), remerge, heads, hd, rope, with_rope=True)
    k = _to_virtual(attn.k_proj(h), remerge, kv_heads, hd, rope, with_rope=True, out=k_out)
    v = _to_virtual(attn.v_proj(h), remerge, kv_heads, hd, rope, with_rope=False, out=v_out)
    rep = heads // kv_heads
    k_att, v_att = (repeat_heads(k, rep), repeat_heads(v, rep)) if rep > 1 else (k, v)
    if mask is None:
        out = F.scaled_dot_product_attention(q, k_att, v_att, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k_att, v_att, attn_mask=mask)
    out = remerge(out.transpose(1, 2).reshape(bsz, remerge.n, heads * hd))
    x, h = rows.norm(layer.post_attention_layernorm, x, attn.o_proj(out))
    return x, rows.mlp(layer.mlp, h), k, v


KVSink = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each (layers, B, H_kv, L, hd)


def _check_sink(
    sink: KVSink, layers: int, bsz: int, kv_heads: int, n: int, hd: int, dtype: torch.dtype
) -> None:
    for buffer in sink:
        shape = tuple(buffer.shape)
        if (len(shape) != 5 or shape[:3] != (layers, bsz, kv_heads) or shape[3] < n or shape[4] != hd
                or buffer.dtype != dtype or buffer.stride(-1) != 1):  # fmt: skip
            raise ValueError(f"a K/V sink must be ({layers}, {bsz}, {kv_heads}, >= {n}, {hd}) {dtype} with a "
                             f"contiguous last dimension, not {shape} {buffer.dtype}")  # fmt: skip


def default_positions(idx: torch.Tensor) -> torch.Tensor:
    """RoPE positions 0..N-1 for every row of a (B, N) virtual sequence with no padding."""
    bsz, n = idx.shape
    return torch.arange(n, device=idx.device)[None].expand(bsz, n)


@torch.no_grad()
def vtu_prefill(
    decoder: nn.Module,
    merged_embeds: torch.Tensor,
    idx: torch.Tensor,
    rope_theta: float,
    positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    options: Options = DEFAULT,
    sink: KVSink | None = None,
) -> VtuOutput:
    """Fast-VTU prefill of a Llama decoder (`LlamaModel`-like: `layers`, `norm`, `config`).

    `merged_embeds` (B, N_u, D) is the merged input sequence and `idx` (B, N) maps virtual
    positions to each sample's merged rows; or `merged_embeds` is packed (1, T, D), every
    sample's rows one after another, and `idx` indexes those T rows (detected by the batch sizes
    differing; at batch 1 both layouts are the same), so the row-wise layers run on the real rows
    only, not on B x the longest. `hidden` comes back in the layout given. `positions` (B, N) are RoPE positions (default 0..N-1) and
    `mask` is an additive (B, 1, N, N) attention mask over the virtual sequence (None: plain
    causal, nothing padded; see `additive_mask`). `sink` (keys, values), each (layers, B, H_kv, L, hd)
    with L >= N, receives the keys and values at positions 0..N-1 (a decode buffer: no copy of a
    full KV cache afterwards), and the output's keys and values are views of it.
    """
    config = decoder.config
    positions = default_positions(idx) if positions is None else positions
    x = merged_embeds
    packed = merged_embeds.shape[0] != idx.shape[0]
    on_gpu = kernels_run_on(merged_embeds)
    remerge = Remerger(idx, merged_embeds.shape[1], merged_embeds.dtype, options.deterministic_remerge, packed,
                       fused=options.fused_remerge and on_gpu)  # fmt: skip
    rows = DecoderRows(options.fused_rows and on_gpu)
    hd = head_dim(config)
    if options.fused_rope and fused_available(merged_embeds, hd):  # RoPE in float32 from float32 halves
        rope = Rope(*half_tables(*rope_cos_sin(positions, hd, rope_theta, torch.float32)), fused=True)
    else:
        rope = Rope(*rope_cos_sin(positions, hd, rope_theta, merged_embeds.dtype), fused=False)
    n = idx.shape[1]
    if sink is not None:
        _check_sink(sink, len(decoder.layers), idx.shape[0], config.num_key_value_heads, n, hd, x.dtype)
    keys, values, pending = [], [], None
    for i, layer in enumerate(decoder.layers):
        k_out, v_out = (sink[0][i, :, :, :n], sink[1][i, :, :, :n]) if sink is not None else (None, None)
        x, pending, k, v = _layer(layer, x, pending, rope, mask, config, remerge, rows, k_out, v_out)
        keys.append(k)
        values.append(v)
    return VtuOutput(rows.norm(decoder.norm, x, pending)[1], keys, values)
