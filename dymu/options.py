"""Runtime switches of the fast paths, in one object passed through the API and the CLI.

Every fast path keeps its plain path and can be switched off here; none is read from the
environment, so what ran is what the caller asked for. Ground floor: no torch, no versions.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import DymuError

DECODE_MODES = ("auto", "graph", "static", "dynamic")


@dataclass(frozen=True)
class Options:
    """How DyMU runs (never what it computes, up to floating-point order).

    - `fused_rope`: VTU's gather + RoPE + head-major write as one Triton kernel (CUDA only);
      off: the torch ops.
    - `fused_rows`: each decoder layer's residual add + RMSNorm and SiLU(gate) * up as Triton kernels
      (`fused_rows.py`; CUDA only), in the VTU prefill and the graph decode's step; off: the modules.
    - `fused_remerge`: VTU's group mean as one Triton kernel over a sorted member list
      (`segment_mean.py`; CUDA only; float32 sums in a fixed order, so the same sums on every run);
      off: float32 `index_add_`. On an H100, on a batch-8 bench mapping (8 x 671 virtual rows, 1472
      merged rows, 7B width) the retuned kernel took 112 us a layer against 273 us for `index_add_`,
      with the same result bit for bit (reports/gpu/h100_segment_mean_sweep.json).
    - `cuda_graphs`: replay the DToMe tower, and the graph decode's step, as captured CUDA graphs
      (CUDA only; elsewhere they run eagerly). On by default: the eager tower is launch-bound (a
      host sync and dozens of small kernels per merging block); on an H200 at batch 1, on varied
      images, it took 55 ms eager against 6.9 ms as one graph (stock CLIP: 13.3 ms;
      reports/gpu/bench/h200_graphs_b1.md).
    - `compile_tower`: inside the whole-tower graph, run each block as `torch.compile` of the
      functional DToMe block (`blocks.static_block`): each merging block's ~60 small kernels and the
      LayerNorms / QuickGELU fuse into a few. On an H100 at batch 8 the tower took 9.4 ms against
      16.0 ms uncompiled (stock CLIP 9.4 ms); the first call per batch shape compiles (about 10 s).
      Off, or where compiling or capturing fails (warned once), the uncompiled graph runs. Only
      with `graph_segment=0`.
    - `graph_segment`: 0 (default) captures the whole tower as one graph at full length, so each
      batch size is captured once and new images never cost a capture; N > 0 captures N-block
      segments and trims the padding between them (less compute, but each new padded shape is a
      new capture of 100-270 ms).
    - `prefill_graph_batch`: on CUDA, the VTU prefill of batches up to this size replays a CUDA
      graph captured per (batch, 64-row bucket, 64-position bucket); 1 by default (batch 1 is
      launch-bound: median prefill 16.8 vs 29.8 ms stock on an H200,
      reports/gpu/bench/h200_prefill_graph_b1.md), 0 runs the plain prefill. Every capture owns
      its cuBLAS workspace (`cuda_graph.own_cublas_workspace`), which is what made the earlier
      illegal memory access after transformers' compiled decode go away.
    - `kv_sink`: with the graph decode, the prefill writes its keys and values straight into the
      decode's static buffer (`generation.prepare(decode_tokens=...)`, and the stock baseline's
      `stock_prepare` through `SinkCache`): no KV cache of the prefill's own and no copy at load (a
      7B model's cache at batch 8 is about 2.6 GB); off: the prefill keeps its own and the decode
      copies it in.
    - `deterministic_remerge`: VTU's group mean as an assignment matmul (fixed reduction
      order, no CUDA atomics) instead of `index_add_`.
    - `decode`: "graph" is dymu's own decode loop: the prefill's keys and values go into a static
      KV buffer and every new token, the first included, comes from one fixed-shape step (a
      replayed CUDA graph on CUDA; eager elsewhere). "static" is transformers' generate from its
      StaticCache (compiled steps, but an eager first step), "dynamic" its generate from the
      growing cache. "auto" (default): graph on CUDA unless the call asks for something the loop
      does not implement (then static where this transformers has it), dynamic on the CPU.
      Greedy tokens are the same on every path.
    """

    fused_rope: bool = True
    fused_rows: bool = True
    fused_remerge: bool = True
    cuda_graphs: bool = True
    compile_tower: bool = True
    graph_segment: int = 0
    prefill_graph_batch: int = 1
    kv_sink: bool = True
    deterministic_remerge: bool = False
    decode: str = "auto"

    def __post_init__(self) -> None:
        if self.decode not in DECODE_MODES:
            raise DymuError(f"decode={self.decode!r}: use one of {', '.join(DECODE_MODES)}")
        if not isinstance(self.graph_segment, int) or self.graph_segment < 0:
            raise DymuError(
                f"graph_segment={self.graph_segment!r}: must be 0 (the whole tower) or a positive number of blocks"
            )
        if not isinstance(self.prefill_graph_batch, int) or self.prefill_graph_batch < 0:
            raise DymuError(
                f"prefill_graph_batch={self.prefill_graph_batch!r}: must be 0 (off) or the largest batch to graph"
            )

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


DEFAULT = Options()
