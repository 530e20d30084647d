"""One-token decode steps of a Llama decoder over pre-allocated buffers, replayed as one CUDA graph.

Why: transformers' `generate` runs its first step eagerly and sets itself up around it (27-34 ms
for a 7B model on an H100, against 7.6-8.8 ms for its later, compiled steps;
reports/gpu/bench/h100_decode_paths_b*.md), and a user's time to first token pays for that. Here
every step, the first included, is the same fixed-shape computation on fixed buffers: per-layer keys and values (B, H_kv, L, hd), the input ids, the
RoPE positions, the write index and the additive key mask. The step updates them in place (the
token at `index` is unmasked and written, then `index` and `positions` advance), so on CUDA one
captured graph replays every step. Off-GPU, or with graphs off, the same step runs eagerly: the
plain path the tests compare with transformers' own decode.

Written against the stable module attributes vtu.py uses (`embed_tokens`, `layers[i].{
input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp}`, `norm`) plus the
LM head; RoPE is the default (unscaled) one, as in the VTU prefill.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cuda_graph import CapturedCall
from .devices import kernels_run_on
from .expand_rope import expand_rope, fused_available
from .fused_rows import DecoderRows
from .rope import apply_rope, half_tables, rope_cos_sin
from .vtu import head_dim, repeat_heads


class StaticDecoder:
    """Decode state for one (batch, length, dtype, device) and the step that advances it (with the
    switches of `use`)."""

    def __init__(self, decoder: nn.Module, lm_head: nn.Module, batch: int, length: int, rope_theta: float,
                 dtype: torch.dtype, device: torch.device, graphs: bool = True, fused_rope: bool = True,
                 fused_rows: bool = True) -> None:  # fmt: skip
        config = decoder.config
        self.decoder, self.lm_head, self.theta = decoder, lm_head, rope_theta
        self.batch, self.length, self.dtype, self.device = batch, length, dtype, device
        self.heads, self.kv_heads, self.hd = (
            config.num_attention_heads,
            config.num_key_value_heads,
            head_dim(config),
        )
        shape = (len(decoder.layers), batch, self.kv_heads, length, self.hd)
        # zeros, not empty: masked positions still enter attention's value product (0 x NaN = NaN)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.ids = torch.zeros(
            batch, 1, dtype=torch.long, device=device
        )  # the example the capture copies into
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.full((batch, 1, 1, length), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.key = (batch, length, dtype, str(device))  # the buffers: what reuse compares
        self.samples = torch.arange(batch, device=device)
        # one captured step per switch set over the same buffers: a benchmark that alternates modes
        # with different switches replays each one's graph instead of re-capturing at every switch
        self.graphs: dict[tuple[bool, bool, bool], CapturedCall | None] = {}
        self.captures = 0
        self.fills = 0  # prefills written into the buffers: what a sink holds is current until the next
        self.use(graphs, fused_rope, fused_rows)

    def use(self, graphs: bool, fused_rope: bool, fused_rows: bool) -> None:
        """Pick the step's switches (its captured graph, if it has one, comes with them)."""
        self.variant = (graphs, fused_rope, fused_rows)
        self.use_graph = graphs and self.keys.is_cuda and self.graphs.get(self.variant, True) is not None
        # RoPE + head-major write of q and k as VTU's Triton kernel (one row per sample), not ~5 torch ops each
        self.fused = fused_rope and fused_available(self.keys, self.hd)
        self.rows = DecoderRows(fused_rows and kernels_run_on(self.keys))  # norms + SiLU*up as kernels
        self.graph = self.graphs.get(self.variant)

    def sink(self) -> tuple[tuple[torch.Tensor, torch.Tensor], Callable[[], bool]]:
        """The key and value buffers (layers, B, H_kv, length, hd) for a prefill to write positions
        0..n-1 of in place (`vtu_prefill(sink=...)`; `load` then copies nothing), and a check that
        says whether what was written there is still unchanged (False after the next sink or load
        of other tensors)."""
        self.fills += 1
        stamp = self.fills
        return (self.keys, self.values), lambda: self.fills == stamp

    def holds(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> bool:
        """Whether these per-layer keys/values are this decoder's own positions 0..n-1 (a sink's)."""
        n = keys[0].shape[2]
        own = [*self.keys[:, :, :, :n].unbind(0), *self.values[:, :, :, :n].unbind(0)]
        given = [*keys, *values]
        return len(given) == len(own) and all(
            t.data_ptr() == o.data_ptr() and t.shape == o.shape and t.stride() == o.stride()
            for t, o in zip(given, own, strict=True)
        )

    def load(self, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor) -> None:
        """Start a decode from a prefill: per-layer (B, H_kv, n, hd) keys/values at positions 0..n-1,
        `valid` (B, n) marking real (not left-padding) positions. The next step writes position n.
        Keys and values already in place (written through `sink`) are not copied."""
        n = keys[0].shape[2]
        if n >= self.length:
            raise ValueError(
                f"a prefill of {n} positions does not fit a {self.length}-position decode buffer"
            )
        if self.use_graph and self.graph is None:
            self._capture()  # its warm-up steps scribble on the state, which is reset below
        if not self.holds(keys, values):
            self.fills += 1
            for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
                self.keys[layer, :, :, :n].copy_(k)
                self.values[layer, :, :, :n].copy_(v)
        self.mask.fill_(torch.finfo(self.dtype).min)
        self.mask[:, 0, 0, :n].masked_fill_(valid.to(self.device, torch.bool), 0.0)
        self.index.fill_(n)
        # RoPE position of the next token: real prompt tokens before it (cumsum(mask) - 1 of HF's generate)
        self.positions.copy_(valid.to(self.device).long().sum(-1, keepdim=True))

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B, 1); returns the next-token logits (B, vocab) in float32. The
        returned tensor is the graph's output buffer: the next step overwrites it."""
        ids = ids.view(self.batch, 1)
        if self.graph is None:
            return self._step(ids)
        return self.graph(ids)[0]

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        decoder, bsz, hd = self.decoder, self.batch, self.hd
        self.mask.index_fill_(-1, self.index, 0.0)  # the new token sees itself
        x = decoder.embed_tokens(ids)
        if self.fused:
            cos, sin = half_tables(*rope_cos_sin(self.positions, hd, self.theta, torch.float32))
        else:
            cos, sin = rope_cos_sin(self.positions, hd, self.theta, x.dtype)
        rep = self.heads // self.kv_heads
        pending = None  # the last MLP output, added to x together with the next norm
        for layer_index, layer in enumerate(decoder.layers):
            attn = layer.self_attn
            x, h = self.rows.norm(layer.input_layernorm, x, pending)
            q, k = (
                self._rope(attn.q_proj(h), self.heads, cos, sin),
                self._rope(attn.k_proj(h), self.kv_heads, cos, sin),
            )
            v = attn.v_proj(h).view(bsz, 1, self.kv_heads, hd).transpose(1, 2)
            keys, values = self.keys[layer_index], self.values[layer_index]
            keys.index_copy_(2, self.index, k)
            values.index_copy_(2, self.index, v)
            if rep > 1:
                keys, values = repeat_heads(keys, rep), repeat_heads(values, rep)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask)
            x, h = self.rows.norm(layer.post_attention_layernorm, x,
                                  attn.o_proj(out.transpose(1, 2).reshape(bsz, 1, self.heads * hd)))  # fmt: skip
            pending = self.rows.mlp(layer.mlp, h)
        logits = self.lm_head(self.rows.norm(decoder.norm, x, pending)[1])[:, -1].float()
        self.index.add_(1)
        self.positions.add_(1)
        return logits

    def _rope(self, x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(B, 1, heads * hd) projections -> RoPE'd (B, heads, 1, hd)."""
        x = x.view(self.batch, 1, heads, self.hd)
        if self.fused:
            return expand_rope(x, self.samples, 1, cos, sin)
        return apply_rope(x, cos, sin).transpose(1, 2)

    def _capture(self) -> None:
        """Record `_step` as one CUDA graph (`cuda_graph.CapturedCall`: warm-up on a side stream, its
        own cuBLAS workspace); if this stack cannot capture it, say so once and stay eager. Its two
        warm-up steps write positions 0 and 1, which are put back: a prefill may be in place already."""
        kept = (self.keys[:, :, :, :2].clone(), self.values[:, :, :, :2].clone())
        self.index.zero_()
        try:
            self.graph = CapturedCall(lambda ids: (self._step(ids),), (self.ids,), pool=None)
        except RuntimeError as err:
            self.use_graph = False
            self.graphs[self.variant] = None  # this switch set stays eager
            warnings.warn(f"dymu: CUDA graph capture of the decode step failed, running eager ({err})",
                          RuntimeWarning, stacklevel=3)  # fmt: skip
            return
        finally:
            self.keys[:, :, :, :2].copy_(kept[0])
            self.values[:, :, :, :2].copy_(kept[1])
        self.graphs[self.variant] = self.graph
        self.captures += 1
