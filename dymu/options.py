"""Runtime switches of the fast paths, in one object passed through the API and the CLI.

Every fast path keeps its plain path and can be switched off here; none is read from the
environment, so what ran is what the caller asked for. Ground floor: no torch, no versions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import DymuError

DECODE_MODES = ("auto", "static", "dynamic")


@dataclass(frozen=True)
class Options:
    """How DyMU runs (never what it computes, up to floating-point order).

    - `fused_rope`: VTU's gather + RoPE + head-major write as one Triton kernel (CUDA only);
      off: the torch ops.
    - `cuda_graphs`: replay the DToMe tower as captured CUDA graph segments (CUDA only). Off by
      default: every new padded shape costs a capture (100-270 ms on an H200), and on varied
      images the eager tower measured 6.3 ms at batch 1 against 40 ms (median) for the graphs,
      and the same 14.7 ms at batch 8 once every shape had been captured
      (reports/gpu/bench/h200_decode_b*.md); turn it on for a fixed, repeated input set.
    - `graph_segment`: blocks per captured segment (fewer: more padding trimmed, more syncs).
    - `deterministic_remerge`: VTU's group mean as an assignment matmul (fixed reduction
      order, no CUDA atomics) instead of `index_add_`.
    - `decode`: "static" decodes from a pre-allocated static KV cache (on CUDA the installed
      transformers compiles that step), "dynamic" from the growing cache; "auto" (default) is
      static on CUDA where this transformers supports it, else dynamic. Greedy tokens are the same.
    """

    fused_rope: bool = True
    cuda_graphs: bool = False
    graph_segment: int = 4
    deterministic_remerge: bool = False
    decode: str = "auto"

    def __post_init__(self) -> None:
        if self.decode not in DECODE_MODES:
            raise DymuError(f"decode={self.decode!r}: use one of {', '.join(DECODE_MODES)}")
        if not isinstance(self.graph_segment, int) or self.graph_segment < 1:
            raise DymuError(f"graph_segment={self.graph_segment!r}: must be a positive integer of blocks")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


DEFAULT = Options()
