"""The graphed VTU prefill's padding (rows and virtual length to BUCKET multiples) changes nothing:
on the CPU the padded computation runs eagerly and must equal the plain `vtu_prefill`."""

from __future__ import annotations

import pytest
import torch
from test_vtu_core import small_llama

from dymu import cuda_graph, prefill_graph
from dymu.compat.shims import rope_theta
from dymu.errors import DymuError
from dymu.generation import PrefillKV, PreparedBatch
from dymu.options import Options
from dymu.prefill_graph import BUCKET, graphed_vtu_prefill, pad_inputs
from dymu.vtu import additive_mask, vtu_prefill


def _assert_same(plain, graphed) -> None:
    torch.testing.assert_close(graphed.hidden, plain.hidden, rtol=1e-5, atol=1e-5)
    for a, b in zip(plain.keys + plain.values, graphed.keys + graphed.values, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_unpadded_prefill_equals_plain(fused: bool) -> None:
    model = small_llama()
    torch.manual_seed(1)
    merged = torch.randn(1, 9, 64)
    merged[:, 0] = 0  # prepare's dump row
    idx = torch.tensor([[1, 2, 2, 3, 4, 4, 4, 5, 6, 7, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8,
                         8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8]])  # fmt: skip  # 40 positions: padded to 64
    options = Options(fused_rope=fused)
    plain = vtu_prefill(model, merged, idx, rope_theta(model.config), options=options)
    _assert_same(plain, graphed_vtu_prefill(model, merged, idx, rope_theta(model.config), options=options))


@pytest.mark.parametrize("packed", [False, True])
def test_batch_with_mask_equals_plain(packed: bool) -> None:
    """A batch of 2 whose shorter row is left-padded, its merged rows padded (B, N_u, D) or packed
    (1, T, D) as `prepare` sends them at batch > 1: the graphed path (eager here, same padding)
    gives the plain prefill's hidden rows, keys and values at the real positions."""
    model = small_llama()
    if packed:
        torch.manual_seed(3)
        merged = torch.randn(1, 9, 64)
        merged[:, 0] = 0  # the dump row; sample 0 owns rows 1-5, sample 1 rows 6-8
        idx = torch.tensor([[1, 1, 2, 3, 3, 4, 5, 5, 5], [0, 0, 0, 6, 6, 7, 7, 8, 8]])
    else:
        torch.manual_seed(2)
        merged = torch.randn(2, 6, 64)
        merged[:, 0] = 0
        merged[1, :3] = 0  # the shorter row is left-padded
        idx = torch.tensor([[1, 1, 2, 3, 3, 4, 5, 5, 5], [0, 0, 0, 3, 3, 4, 4, 5, 5]])
    valid = idx != 0
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    mask = additive_mask(causal[None, None] & valid[:, None, None, :], merged.dtype)
    args = (model, merged, idx, rope_theta(model.config), positions, mask)
    plain = vtu_prefill(*args)
    graphed = graphed_vtu_prefill(*args)
    assert graphed.hidden.shape == plain.hidden.shape == merged.shape
    # compare the real positions (row 0 and padded positions are dumps either way)
    torch.testing.assert_close(graphed.hidden[:, 1:], plain.hidden[:, 1:], rtol=1e-5, atol=1e-5)
    for b, first in enumerate((0, 3)):
        for a, g in zip(plain.keys + plain.values, graphed.keys + graphed.values, strict=True):
            torch.testing.assert_close(g[b, :, first:], a[b, :, first:], rtol=1e-5, atol=1e-5)


def test_padding_reaches_bucket_multiples_rows_in_front_positions_at_the_end() -> None:
    """Padded rows go first (zero, read by no real position); padded positions go last, so a real
    position p stays at p (where a decode buffer wants it) and causal attention hides the padding:
    no mask is needed when none was given."""
    merged, idx = torch.randn(1, 40, 8), torch.randint(1, 40, (1, 70))
    merged_p, idx_p, positions_p, mask_p, pad_u, pad_n = pad_inputs(merged, idx, torch.arange(70)[None], None)
    assert merged_p.shape[1] % BUCKET == 0 and idx_p.shape[1] % BUCKET == 0 and (pad_u, pad_n) == (24, 58)
    assert bool((merged_p[:, :pad_u] == 0).all()) and torch.equal(merged_p[:, pad_u:], merged)
    assert torch.equal(idx_p[:, :70], idx + pad_u) and bool((idx_p[:, 70:] == 0).all())  # padding: zero row 0
    assert torch.equal(positions_p[0, :70], torch.arange(70)) and mask_p is None


def test_graph_options_are_checked() -> None:
    with pytest.raises(DymuError, match="prefill_graph_batch"):
        Options(prefill_graph_batch=-1)
    with pytest.raises(DymuError, match="graph_segment"):
        Options(graph_segment=-2)
    assert Options().graph_segment == 0 and Options().cuda_graphs


def test_a_given_mask_is_kept_and_padded_rows_see_themselves() -> None:
    """A given mask covers the real positions; no real query sees a padded key; and in bf16 a row of
    only `finfo.min` can overflow to -inf in SDPA and turn into NaN, so padded rows see themselves."""
    idx = torch.randint(1, 5, (2, 10))
    mask = additive_mask(torch.ones(10, 10, dtype=torch.bool).tril()[None, None].expand(2, 1, 10, 10),
                         torch.bfloat16)  # fmt: skip
    *_, mask_p, _, pad_n = pad_inputs(torch.randn(2, 5, 8), idx, torch.arange(10).expand(2, 10), mask)
    assert pad_n == 54 and mask_p is not None and mask_p.dtype == torch.bfloat16
    assert torch.equal(mask_p[..., :10, :10], mask)
    assert bool((mask_p[..., :10, 10:] < 0).all())  # real queries never see the padding
    assert not bool((mask_p[0, 0].diagonal() < 0).any()) and bool((mask_p[0, 0, 10:, :10] < 0).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_on_cuda_a_replayed_graph_equals_the_plain_prefill() -> None:
    """Captured once, replayed for a second image whose merged-row count is in the same bucket."""
    model = small_llama().cuda()
    theta = rope_theta(model.config)
    for n_u, seed in ((9, 3), (12, 4), (9, 5)):  # 9 and 12 rows share a row bucket
        torch.manual_seed(seed)
        merged = torch.randn(1, n_u, 64, device="cuda")
        merged[:, 0] = 0
        idx = torch.randint(1, n_u, (1, 40), device="cuda").sort(dim=1).values
        plain = vtu_prefill(model, merged, idx, theta)
        _assert_same(plain, graphed_vtu_prefill(model, merged, idx, theta))
    assert prefill_graph._decoders[model].graphs.captures == 1


def test_a_capture_gets_its_own_cublas_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuBLAS workspaces are cleared right before a capture (so the graph's GEMMs allocate theirs in
    the graph's pool) and right after it (so the next capture does not share it), also when the
    capture fails: a workspace that someone else frees later must never be one a graph embeds."""
    calls: list[str] = []
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: calls.append("clear"), raising=False)
    with cuda_graph.own_cublas_workspace():
        calls.append("capture")
    assert calls == ["clear", "capture", "clear"]
    calls.clear()
    with pytest.raises(RuntimeError), cuda_graph.own_cublas_workspace():
        calls.append("capture")
        raise RuntimeError("capture failed")
    assert calls == ["clear", "capture", "clear"]


def test_borrowed_prefill_is_the_same_values_until_the_next_prefill_overwrites_them() -> None:
    """`borrow=True` hands out views of the shared K/V buffer (no second KV cache at the peak): the
    same values as the copies, current until the next prefill of that shape, then refused by the
    batch that holds them (a stale cache would decode silently wrong)."""
    model = small_llama()
    theta = rope_theta(model.config)
    torch.manual_seed(4)
    merged = torch.randn(1, 9, 64)
    merged[:, 0] = 0
    idx = torch.tensor([[1, 2, 2, 3, 4, 5, 6, 7, 8, 8]])
    copied = graphed_vtu_prefill(model, merged, idx, theta)
    borrowed = graphed_vtu_prefill(model, merged, idx, theta, borrow=True)
    assert copied.current is None and borrowed.current is not None and borrowed.current()
    _assert_same(copied, borrowed)
    batch = PreparedBatch(PrefillKV(borrowed.keys, borrowed.values, borrowed.current), idx, idx, [1], None)
    assert batch.tensors()[0][0] is borrowed.keys[0]  # handed over, not copied
    graphed_vtu_prefill(model, torch.randn(1, 9, 64), idx, theta)  # another sample, same shape
    assert not borrowed.current()
    assert not torch.equal(borrowed.keys[0], copied.keys[0])  # the buffer really was overwritten
    with pytest.raises(DymuError, match="overwritten"):
        batch.tensors()
    with pytest.raises(DymuError, match="overwritten"):
        batch.cache  # noqa: B018 - the property is the check


def test_a_graph_caches_constant_input_is_made_once_per_key() -> None:
    """The tower's thresholds go to the device once per threshold set, not before every replay."""
    graphs = cuda_graph.GraphCache()
    made: list[int] = []

    def make(value: int):
        return lambda: made.append(value) or torch.tensor([float(value)])

    first = graphs.constant(("a",), make(1))
    assert graphs.constant(("a",), make(2)) is first and made == [1]
    assert float(graphs.constant(("b",), make(3))) == 3.0 and made == [1, 3]
    for i in range(cuda_graph._MAX_CONSTANTS + 1):  # bounded: the oldest go
        graphs.constant(("c", i), make(i))
    assert ("a",) not in graphs.constants and len(graphs.constants) == cuda_graph._MAX_CONSTANTS
