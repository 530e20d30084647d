"""CUDA-graph replay of the static-shape DToMe tower.

Eager DToMe is launch-bound on a GPU: each merge step is dozens of small kernels, and
at batch 1 the CPU cannot issue them as fast as the GPU runs them. The static-shape
tower (`forward_tokens(static=True)`) never syncs with the host, so one capture per
(tower, batch shape, dtype, thresholds) replays all blocks with a single launch.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict

import torch
from torch import nn

from .tower import MergeRule, TokenState, forward_tokens

_MAX_GRAPHS_PER_TOWER = 8
_cache: weakref.WeakKeyDictionary[nn.Module, OrderedDict] = weakref.WeakKeyDictionary()
_failed: set[str] = set()


class GraphedTower:
    """One captured tower forward for fixed input shape; replay copies inputs in and state out."""

    def __init__(
        self, vt: nn.Module, rule: MergeRule, may_merge: list[bool], n_run: int, example: torch.Tensor
    ):
        self.static_input = example.clone()
        stream = torch.cuda.Stream(device=example.device)
        stream.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up kernels and the allocator outside the capture
                forward_tokens(vt, self.static_input, rule, may_merge, n_run, static=True)
        torch.cuda.current_stream(example.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.state = forward_tokens(vt, self.static_input, rule, may_merge, n_run, static=True)

    def __call__(self, pixel_values: torch.Tensor) -> TokenState:
        self.static_input.copy_(pixel_values)
        self.graph.replay()
        s = self.state
        return TokenState(s.x.clone(), s.size.clone(), s.pos.clone(), s.lengths.clone(), s.counts.clone())


def graphed_forward(
    vt: nn.Module,
    pixel_values: torch.Tensor,
    rule: MergeRule,
    may_merge: list[bool],
    n_run: int,
    key: tuple,
) -> TokenState | None:
    """Replay (capturing on first use) the tower for this input shape; None if capture fails."""
    full_key = (tuple(pixel_values.shape), pixel_values.dtype, str(pixel_values.device), n_run, *key)
    graphs = _cache.setdefault(vt, OrderedDict())
    graphed = graphs.get(full_key)
    if graphed is None:
        if str(full_key) in _failed:
            return None
        try:
            graphed = GraphedTower(vt, rule, may_merge, n_run, pixel_values)
        except RuntimeError as err:  # capture unsupported on this stack: fall back to eager
            _failed.add(str(full_key))
            warnings.warn(
                f"dymu: CUDA graph capture failed, running eager ({err})", RuntimeWarning, stacklevel=3
            )
            return None
        graphs[full_key] = graphed
        while len(graphs) > _MAX_GRAPHS_PER_TOWER:
            graphs.popitem(last=False)
    graphs.move_to_end(full_key)
    return graphed(pixel_values)
