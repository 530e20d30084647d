"""Virtual token unmerging (fast VTU) for a Llama decoder stack (DYMU_SPEC.md section 3).

Row-wise work (norms, q/k/v/o projections, MLP) runs on the N_u merged rows; attention
runs at the virtual length N (text + 576 image positions) after expanding q/k/v with
`idx` and applying RoPE at the virtual positions, then its output is remerged (group
mean) back to N_u rows. Written against stable module attributes (`embed_tokens`,
`layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp}`,
`norm`) and torch SDPA, so HF attention refactors do not reach it.

Family integration (HF Llava, legacy llava) and the transformers cache object live in
their own modules; this one returns plain per-layer (key, value) tensors at length N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DymuError
from .expand_rope import fused_available, half_tables
from .scatter import group_mean


def rope_theta(config) -> float:
    """RoPE base from a Llama config of any transformers version (4.x attr or 5.x rope_parameters)."""
    params = getattr(config, "rope_parameters", None)
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(params, dict):
        scaling = params
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind not in (None, "default"):
        raise DymuError(f"rope scaling type {kind!r} is not supported by dymu's VTU (LLaVA-1.5 uses none)")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype):
    """cos/sin (B, N, 1, dim) for HF's rotate-half RoPE convention, computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, :, None].to(dtype), emb.sin()[:, :, None].to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def expand_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """M·e: (B, N_u, ...) -> (B, N, ...) with row b taking x[b, idx[b, j]] (functional form;
    the prefill reuses one `Remerger` per batch instead)."""
    bsz, n_u = x.shape[:2]
    flat = (idx + torch.arange(bsz, device=idx.device)[:, None] * n_u).flatten()
    return x.reshape(bsz * n_u, *x.shape[2:]).index_select(0, flat).view(bsz, idx.shape[1], *x.shape[2:])


def remerge_rows(y: torch.Tensor, idx: torch.Tensor, n_u: int, deterministic: bool = False) -> torch.Tensor:
    """P·y: (B, N, ...) -> (B, N_u, ...), the mean of the virtual rows of each merged row."""
    bsz, n = y.shape[:2]
    flat = (idx + torch.arange(bsz, device=idx.device)[:, None] * n_u).flatten()
    out = group_mean(y.reshape(bsz * n, *y.shape[2:]), flat, bsz * n_u, dim=0, deterministic=deterministic)
    return out.view(bsz, n_u, *y.shape[2:])


class Remerger:
    """M·e (expand) and P·y (remerge) for one fixed mapping, built once per prefill and shared
    by every layer.

    Expand is a row gather. Remerge sums in float32 with `index_add_` and scales by 1/count;
    `deterministic=True` uses a 0/1 assignment-matrix matmul instead (fixed reduction order,
    no CUDA atomics; measured slower on H200).
    """

    def __init__(self, idx: torch.Tensor, n_u: int, dtype: torch.dtype, deterministic: bool = False) -> None:
        bsz, n = idx.shape
        self.n_u, self.n, self.deterministic = n_u, n, deterministic
        self.flat = (idx + torch.arange(bsz, device=idx.device)[:, None] * n_u).flatten()
        counts = torch.bincount(self.flat, minlength=bsz * n_u).view(bsz, n_u, 1)
        self.inv_count = 1.0 / counts.float().clamp_min(1.0)
        if deterministic:
            self.assign = torch.zeros(bsz, n_u, n, dtype=dtype, device=idx.device)
            self.assign.scatter_(1, idx[:, None, :], 1.0)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N_u, ...) -> (B, N, ...): each virtual row copies its merged row."""
        bsz = x.shape[0]
        rows = x.reshape(bsz * self.n_u, *x.shape[2:]).index_select(0, self.flat)
        return rows.view(bsz, self.n, *x.shape[2:])

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, N_u, D): the mean of each merged row's virtual rows."""
        bsz, _, dim = y.shape
        if self.deterministic:
            summed = torch.bmm(self.assign, y).float()
        else:
            summed = torch.zeros(bsz * self.n_u, dim, dtype=torch.float32, device=y.device)
            summed.index_add_(0, self.flat, y.reshape(bsz * self.n, dim).float())
            summed = summed.view(bsz, self.n_u, dim)
        return (summed * self.inv_count).to(y.dtype)


@dataclass
class VtuOutput:
    """Final-norm hidden states on merged rows, and per-layer post-RoPE (K, V) at length N."""

    hidden: torch.Tensor  # (B, N_u, D)
    keys: list[torch.Tensor]  # (B, H_kv, N, hd) each
    values: list[torch.Tensor]


def virtual_mask(decoder: nn.Module, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, N, N) additive prefill mask over the virtual sequence: the decoder's own causal +
    padding mask, built through this transformers version's masking API (the causal-mask fix),
    so VTU attends as stock LLaVA does (DYMU_SPEC step 4). Padded query rows also see
    themselves, so no row is fully masked (their outputs only reach the dump row)."""
    from .compat.core import causal_mask

    bsz, n = valid.shape
    probe = torch.zeros(1, 1, decoder.config.hidden_size, dtype=dtype, device=valid.device).expand(bsz, n, -1)
    allowed = causal_mask(decoder, probe, valid.long()).to(valid.device)
    allowed = allowed | torch.eye(n, dtype=torch.bool, device=valid.device)[None, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


@dataclass
class Rope:
    """RoPE tables at the virtual positions, in the form the expand path wants."""

    cos: torch.Tensor
    sin: torch.Tensor
    fused: bool  # True: float32 (B*N, hd/2) halves for the Triton kernel; False: (B, N, 1, hd)


def _to_virtual(x: torch.Tensor, remerge: Remerger, heads: int, hd: int, rope: Rope, with_rope: bool):
    """(B, N_u, heads*hd) merged projections -> (B, heads, N, hd) at the virtual rows."""
    x = x.view(x.shape[0], -1, heads, hd)
    if rope.fused:
        from .expand_rope import expand_rope

        return expand_rope(x, remerge.flat, remerge.n, *((rope.cos, rope.sin) if with_rope else (None, None)))
    x = remerge.expand(x)
    if with_rope:
        x = apply_rope(x, rope.cos, rope.sin)
    return x.transpose(1, 2)


def _layer(layer: nn.Module, x, rope: Rope, mask, config, remerge: Remerger):
    attn = layer.self_attn
    bsz = x.shape[0]
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, head_dim(config)
    h = layer.input_layernorm(x)
    # projections on the N_u merged rows; then gather to the N virtual rows (+ RoPE there)
    q = _to_virtual(attn.q_proj(h), remerge, heads, hd, rope, with_rope=True)
    k = _to_virtual(attn.k_proj(h), remerge, kv_heads, hd, rope, with_rope=True)
    v = _to_virtual(attn.v_proj(h), remerge, kv_heads, hd, rope, with_rope=False)
    rep = heads // kv_heads
    k_att = k.repeat_interleave(rep, dim=1) if rep > 1 else k
    v_att = v.repeat_interleave(rep, dim=1) if rep > 1 else v
    if mask is None:
        out = F.scaled_dot_product_attention(q, k_att, v_att, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k_att, v_att, attn_mask=mask)
    out = remerge(out.transpose(1, 2).reshape(bsz, remerge.n, heads * hd))
    x = x + attn.o_proj(out)
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x, k, v


@torch.no_grad()
def vtu_prefill(
    decoder: nn.Module,
    merged_embeds: torch.Tensor,
    idx: torch.Tensor,
    positions: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    deterministic: bool = False,
) -> VtuOutput:
    """Fast-VTU prefill of a Llama decoder (`LlamaModel`-like: `layers`, `norm`, `config`).

    `merged_embeds` (B, N_u, D) is the merged input sequence, `idx` (B, N) maps virtual
    positions to merged rows, `positions` (B, N) are RoPE positions (default 0..N-1) and
    `valid` (B, N) marks real virtual positions (None: all real, plain causal mask).
    `deterministic=True` remerges with an assignment matmul (no CUDA atomics).
    """
    config = decoder.config
    bsz, n = idx.shape
    if positions is None:
        positions = torch.arange(n, device=idx.device)[None].expand(bsz, n)
    mask = None if valid is None else virtual_mask(decoder, valid, merged_embeds.dtype)
    x = merged_embeds
    remerge = Remerger(idx, merged_embeds.shape[1], merged_embeds.dtype, deterministic)
    hd, theta = head_dim(config), rope_theta(config)
    if fused_available(merged_embeds, hd):  # Triton: RoPE in float32 from float32 half tables
        rope = Rope(*half_tables(*rope_cos_sin(positions, hd, theta, torch.float32)), fused=True)
    else:
        rope = Rope(*rope_cos_sin(positions, hd, theta, merged_embeds.dtype), fused=False)
    keys, values = [], []
    for layer in decoder.layers:
        x, k, v = _layer(layer, x, rope, mask, config, remerge)
        keys.append(k)
        values.append(v)
    return VtuOutput(decoder.norm(x), keys, values)
