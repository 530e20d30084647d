"""CUDA-graph replay: a keyed cache of captured calls, and the DToMe tower replayed through it.

Eager DToMe is launch-bound on a GPU: each merge step is dozens of small kernels, and
the CPU cannot issue them as fast as the GPU runs them. The static-shape blocks
(`run_blocks(static=True)`) never sync with the host, so the whole tower (segment 0, the
default) is captured once per batch shape and replayed with one launch. With `segment`
N > 0, N-block segments are captured instead and between them the host reads the longest
row once and trims the padding to a multiple of `BUCKET`: less compute, but every new
padded shape is a new capture. With `compiled`, the whole-tower graph replays `static_block`
compiled by torch.compile instead (its ~60 small kernels per merging block fused into a few);
if compiling or capturing it fails, the plain whole-tower graph runs. Graphs are cached per (module, segment, shapes,
thresholds) and share one memory pool per cache; they are always replayed one after
another on one stream, and a caller copies out what it keeps before the next replay.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .blocks import (
    BUCKET,
    BlockStep,
    MergeRule,
    TokenState,
    embed,
    functional_blocks,
    run_blocks,
    static_block,
    static_forward,
)

# one batch shape needs up to (segments - 1) x (577 / BUCKET) + 1 ~ 96 graphs at LLaVA's geometry: room for
# a few batch shapes, so a long run stops capturing once every bucket has been seen
_MAX_GRAPHS_PER_TOWER = 320
_MAX_CONSTANTS = 8  # threshold sets per tower kept on the device


@contextlib.contextmanager
def own_cublas_workspace() -> Iterator[None]:
    """Make a capture allocate its own cuBLAS workspace, inside the graph's memory pool.

    Why: cuBLAS keeps one persistent workspace per (handle, stream), allocated outside any graph,
    and a captured GEMM embeds its raw address. Whoever clears those workspaces later (inductor's
    CUDA graph trees do, globally, around every warm-up and recording: transformers' compiled
    static decode) frees memory our graphs still write: an illegal memory access on the next
    replay (seen on an H200 with the graphed prefill followed by compiled static decode; see
    pytorch/pytorch#193402 for the same lifetime problem). Clearing right before the capture makes
    its GEMMs allocate a workspace in the capture's private pool, owned by the graph; clearing
    after it keeps the next capture from sharing that one."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # present in every torch we support
    if clear is not None:
        clear()
    try:
        yield
    finally:
        if clear is not None:
            clear()


class CapturedCall:
    """`fn(*inputs)` captured for fixed input shapes; replay copies inputs in, returns static outputs."""

    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], example: tuple[torch.Tensor, ...], pool):
        self.inputs = tuple(t.clone() for t in example)
        device = self.inputs[0].device
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and the allocator outside the capture
                fn(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with own_cublas_workspace(), torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for static, value in zip(self.inputs, inputs, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.outputs


class GraphCache:
    """Captured calls by key, least recently used evicted beyond `limit`; a key whose capture
    failed runs eagerly from then on (with one warning). Off-GPU every call runs eagerly."""

    def __init__(self, limit: int = _MAX_GRAPHS_PER_TOWER) -> None:
        self.limit = limit
        self.pool = None
        self.calls: OrderedDict[tuple, CapturedCall] = OrderedDict()
        self.failed: set[tuple] = set()
        self.captures = 0  # graphs captured so far (each costs far more than a replay)
        self.constants: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def constant(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A small input that stays the same from call to call (the thresholds on the device), made
        once per key: no host-to-device copy, which waits on the host, before every replay."""
        if key not in self.constants:
            self.constants[key] = make()
            while len(self.constants) > _MAX_CONSTANTS:
                self.constants.popitem(last=False)
        self.constants.move_to_end(key)
        return self.constants[key]

    def drop(self, unwanted: Callable[[tuple], bool]) -> None:
        """Forget the captured calls whose key is unwanted (their memory goes with them)."""
        for key in [key for key in self.calls if unwanted(key)]:
            del self.calls[key]

    def call(
        self, key: tuple, fn: Callable, inputs: tuple[torch.Tensor, ...], fallback: str = "eager"
    ) -> tuple[torch.Tensor, ...] | None:
        if inputs[0].device.type != "cuda":  # no graphs off-GPU: run the same segments eagerly
            return fn(*inputs)
        captured = self.calls.get(key)
        if captured is None:
            if key in self.failed:
                return None
            try:
                self.pool = self.pool or torch.cuda.graph_pool_handle()
                captured = CapturedCall(fn, inputs, self.pool)
                self.captures += 1
            except RuntimeError as err:  # capture unsupported on this stack: fall back to eager
                self.failed.add(key)
                warnings.warn(
                    f"dymu: CUDA graph capture failed, running {fallback} ({err})",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return None
            self.calls[key] = captured
            while len(self.calls) > self.limit:
                self.calls.popitem(last=False)
        self.calls.move_to_end(key)
        return captured(*inputs)


_towers: weakref.WeakKeyDictionary[nn.Module, GraphCache] = weakref.WeakKeyDictionary()


def capture_count(vision_model: nn.Module) -> int:
    """CUDA graphs captured so far for a tower (a benchmark reports captures inside timed samples)."""
    return sum(
        graphs.captures for vt, graphs in _towers.items() if any(m is vt for m in vision_model.modules())
    )


def _bucket(state: TokenState) -> int:
    longest = int(state.lengths.max())  # the one host sync per segment
    return min(state.x.shape[1], -(-longest // BUCKET) * BUCKET)


_compiled_step: BlockStep | None = None


def compiled_step() -> BlockStep:
    """`static_block` through torch.compile, made once per process: it takes tensors, not modules,
    so one compiled graph serves every block of every tower of the same shapes."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(static_block, fullgraph=True)
    return _compiled_step


def release_compile_workers() -> None:
    """Stop inductor's compile-worker processes once a compile is done (they are restarted if another
    shape compiles). Left running they idle for a minute after each compile, a process per core, and
    meanwhile the host's own work slows: on an H100 machine the batch-8 image preprocessing of a
    benchmark that had just compiled took 260-300 ms against 14-19 ms without a compile."""
    async_compile = sys.modules.get("torch._inductor.async_compile")  # never imported here
    shutdown = getattr(async_compile, "shutdown_compile_workers", None)
    if shutdown is not None:
        shutdown()


def _compiled_tower(
    graphs: GraphCache,
    vt: nn.Module,
    pixel_values: torch.Tensor,
    thresholds: torch.Tensor,
    may_merge: list[bool],
    n_run: int,
    key: tuple,
) -> TokenState | None:
    device = pixel_values.device
    # `key` holds the thresholds' values: a new set gets its own device copy, a repeat none
    tau = graphs.constant((key, str(device)), lambda: thresholds.to(device, torch.float32))
    inputs = (pixel_values, tau)
    call_key = (key, "compiled", n_run, tuple((tuple(t.shape), t.dtype, str(t.device)) for t in inputs))
    # a replay (or a capture that failed) needs no weights: gather them (about 0.4 ms of host work for
    # 24 blocks) only when this call is still to be captured
    settled = call_key in graphs.calls or call_key in graphs.failed
    blocks = None if settled else functional_blocks(vt)
    if blocks is None and not settled:
        return None

    def fn(px: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, ...]:
        assert blocks is not None  # fn only runs when the call is captured (or run off-GPU)
        return static_forward(vt, px, tau, may_merge, n_run, blocks, compiled_step()).tensors()

    captures = graphs.captures
    outputs = graphs.call(call_key, fn, inputs, fallback="the uncompiled graph")
    if graphs.captures != captures:
        release_compile_workers()
    if outputs is None:
        return None
    return TokenState(*(t.clone() for t in outputs), uniform=not any(may_merge[:n_run]))


def graphed_forward(
    vt: nn.Module,
    pixel_values: torch.Tensor,
    rule: MergeRule,
    may_merge: list[bool],
    n_run: int,
    key: tuple,
    segment: int = 0,
    compiled_thresholds: torch.Tensor | None = None,
) -> TokenState | None:
    """The first `n_run` blocks as replayed graph segments of `segment` blocks (0: all of them
    in one graph); None if capture is not possible (off-GPU the same segments run eagerly).
    `compiled_thresholds` (the rule's thresholds, segment 0 only) replays the compiled blocks."""
    graphs = _towers.setdefault(vt, GraphCache())
    if compiled_thresholds is not None and segment == 0:
        state = _compiled_tower(graphs, vt, pixel_values, compiled_thresholds, may_merge, n_run, key)
        if state is not None:
            return state
    bounds = [*range(0, n_run, segment or n_run), n_run]
    state: TokenState | None = None
    for start, stop in itertools.pairwise(bounds):
        uniform_in = not any(may_merge[:start])
        uniform_out = not any(may_merge[:stop])

        if state is None:

            def fn(px: torch.Tensor, stop: int = stop) -> tuple[torch.Tensor, ...]:
                return run_blocks(vt, embed(vt, px), 0, stop, rule, may_merge, static=True).tensors()

            inputs: tuple[torch.Tensor, ...] = (pixel_values,)
        else:

            def fn(*tensors: torch.Tensor, start: int = start, stop: int = stop, uniform: bool = uniform_in):
                return run_blocks(
                    vt, TokenState(*tensors, uniform), start, stop, rule, may_merge, True
                ).tensors()

            inputs = state.trimmed(_bucket(state)).tensors()
        call_key = (key, start, stop, tuple((tuple(t.shape), t.dtype, str(t.device)) for t in inputs))
        outputs = graphs.call(call_key, fn, inputs)
        if outputs is None:
            return None
        state = TokenState(*outputs, uniform=uniform_out)
    assert state is not None
    return TokenState(*(t.clone() for t in state.tensors()), uniform=state.uniform)
