"""The decoder's fused row kernels (residual add + RMSNorm, SiLU * up) and the segment-mean remerge
equal their plain paths: kernel by kernel, through `Remerger`, through a whole `vtu_prefill` and
through a graph-decode step. The kernels run in Triton's interpreter on CPU tensors (a subprocess:
`triton_interp.py`); the GPU cells and the device checks run them compiled. The fallbacks (models
the kernels do not describe) are checked in process, with the kernels replaced by tripwires."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel
from triton_interp import run_interpreted

from dymu import fused_rows
from dymu.fused_rows import DecoderRows

PRELUDE = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    BF16_ULP = 2.0 ** -7  # the interpreter truncates float32 -> bfloat16; compiled kernels round

    def llama(dtype=torch.float32):
        config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=50, max_position_embeddings=256)
        torch.manual_seed(1)
        model = LlamaModel(config).eval().to(dtype)
        with torch.no_grad():  # weights away from 1, so a kernel that ignored them would show
            for p in model.parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
        return model
    """
)

SEGMENT_MEAN = PRELUDE + textwrap.dedent(
    """
    from dymu.scatter import group_count, group_sum
    from dymu.segment_mean import Segments, segment_mean
    R, G, D = 70, 12, 300  # D is not a multiple of the kernel's column block
    index = torch.randint(0, G - 2, (R,))  # the last two groups are empty
    index[:40] = 3  # one group with more members than one tile holds
    counts = group_count(index, G)
    segments = Segments.of(index, counts)
    assert segments.offsets.tolist() == [0, *counts.cumsum(0).tolist()]
    assert torch.equal(index[segments.members], index.sort().values)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, BF16_ULP)):
        y = (torch.randn(R, D) * 3).to(dtype)
        want = group_sum(y.float(), index, G) / counts.clamp_min(1)[:, None]
        got = segment_mean(y, segments)
        assert got.dtype == dtype and got.shape == (G, D)
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
        assert torch.equal(got[-2:], torch.zeros(2, D, dtype=dtype))
        assert torch.equal(segment_mean(y, segments), got)  # a fixed order: the same sums every run

    from dymu.vtu import Remerger
    idx = torch.tensor([[0, 1, 1, 2, 2, 2, 3], [0, 0, 1, 2, 3, 3, 3]])
    y = torch.randn(2, 7, 24)
    for packed in (False, True):
        flat_idx = torch.tensor([[0, 1, 1, 2, 2, 2, 3], [4, 4, 5, 6, 7, 7, 7]]) if packed else idx
        n_u = 8 if packed else 4
        plain = Remerger(flat_idx, n_u, torch.float32, packed=packed)
        fused = Remerger(flat_idx, n_u, torch.float32, packed=packed, fused=True)
        assert plain.segments is None and fused.segments is not None
        torch.testing.assert_close(fused(y), plain(y), rtol=1e-6, atol=1e-6)
    print("segment mean ok")
    """
)

ROWS = PRELUDE + textwrap.dedent(
    """
    from dymu.fused_rows import DecoderRows, add_rms_norm, silu_mul
    layer = llama().layers[0]
    norm, mlp = layer.input_layernorm, layer.mlp
    fused, plain = DecoderRows(True), DecoderRows(False)
    x, add = torch.randn(3, 5, 64) * 4, torch.randn(3, 5, 64)
    with torch.no_grad():
        for a in (None, add):
            (xs, h), (xs_plain, h_plain) = fused.norm(norm, x, a), plain.norm(norm, x, a)
            assert torch.equal(xs, xs_plain)  # float32 sums round the same
            torch.testing.assert_close(h, h_plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused.mlp(mlp, h), mlp(h), rtol=1e-5, atol=1e-5)
        b16 = llama(torch.bfloat16).layers[0]
        xb, ab = x.bfloat16(), add.bfloat16()
        s, h = add_rms_norm(xb, ab, b16.input_layernorm.weight, b16.input_layernorm.variance_epsilon)
        assert s.dtype == h.dtype == torch.bfloat16
        torch.testing.assert_close(s.float(), (xb + ab).float(), rtol=BF16_ULP, atol=0)
        torch.testing.assert_close(h.float(), b16.input_layernorm(xb + ab).float(), rtol=2 * BF16_ULP, atol=1e-2)
        g, u = torch.randn(4, 96).bfloat16(), torch.randn(4, 96).bfloat16()
        torch.testing.assert_close(silu_mul(g, u).float(), (F.silu(g) * u).float(), rtol=2 * BF16_ULP, atol=1e-3)
    print("rows ok")
    """
)

PREFILL_AND_STEP = PRELUDE + textwrap.dedent(
    """
    import dymu.static_decode as static_decode
    import dymu.vtu as vtu
    from dymu.options import Options
    from dymu.static_decode import StaticDecoder
    decoder = llama()
    idx = torch.tensor([[0, 1, 2, 2, 3, 3, 3, 4, 5], [0, 1, 1, 1, 2, 3, 4, 4, 5]])
    merged = torch.randn(2, 6, 64)
    with torch.no_grad():
        plain = vtu.vtu_prefill(decoder, merged, idx, 10000.0)
        vtu.kernels_run_on = lambda x: True  # the CUDA decision, taken here for CPU tensors
        fused = vtu.vtu_prefill(decoder, merged, idx, 10000.0, options=Options(fused_remerge=True))
        torch.testing.assert_close(fused.hidden, plain.hidden, rtol=1e-4, atol=1e-4)
        for got, want in zip(fused.keys + fused.values, plain.keys + plain.values):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        off = vtu.vtu_prefill(decoder, merged, idx, 10000.0, options=Options(fused_rows=False, fused_remerge=False))
        assert torch.equal(off.hidden, plain.hidden)  # the switches reach the prefill

        head = torch.nn.Linear(64, 50, bias=False)
        steps = []
        for kernels in (False, True):
            static_decode.kernels_run_on = lambda x, on=kernels: on
            step = StaticDecoder(decoder, head, 2, 16, 10000.0, torch.float32, torch.device("cpu"))
            assert step.rows.fused is kernels
            step.load(plain.keys, plain.values, torch.ones(2, 9, dtype=torch.bool))
            steps.append(torch.stack([step.step(torch.tensor([[3], [4]])), step.step(torch.tensor([[5], [6]]))]))
        torch.testing.assert_close(steps[1], steps[0], rtol=1e-4, atol=1e-4)
    print("prefill and step ok")
    """
)


@pytest.mark.parametrize("code, done", [(SEGMENT_MEAN, "segment mean ok"), (ROWS, "rows ok"),
                                        (PREFILL_AND_STEP, "prefill and step ok")],
                         ids=["segment-mean", "rows", "prefill-and-step"])  # fmt: skip
def test_kernels_equal_the_plain_path_in_the_interpreter(code: str, done: str) -> None:
    run_interpreted(code, done)


def _tripwire(*args, **kwargs):
    raise AssertionError("a fused kernel ran for a model it does not describe")


@pytest.fixture
def tripwires(monkeypatch):
    monkeypatch.setattr(fused_rows, "add_rms_norm", _tripwire)
    monkeypatch.setattr(fused_rows, "silu_mul", _tripwire)


def _layer():
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=20)  # fmt: skip
    torch.manual_seed(0)
    return LlamaModel(config).eval().layers[0]


def test_models_the_kernels_do_not_describe_run_their_own_modules(tripwires) -> None:
    """Another norm class, a weight in another dtype, another activation or no gate: the modules."""
    layer, rows = _layer(), DecoderRows(True)
    x, add = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        layer_norm = nn.LayerNorm(32)
        summed, out = rows.norm(layer_norm, x, add)
        assert torch.equal(summed, x + add) and torch.equal(out, layer_norm(x + add))
        norm = layer.input_layernorm
        norm.weight.data = norm.weight.data.double()
        assert torch.equal(rows.norm(norm, x)[1], norm(x))
        mlp = layer.mlp
        mlp.act_fn = nn.GELU()
        assert torch.equal(rows.mlp(mlp, x), mlp(x))
        dense = nn.Sequential(nn.Linear(32, 8), nn.SiLU())
        assert torch.equal(rows.mlp(dense, x), dense(x))


def test_the_fused_paths_are_taken_where_the_model_allows_and_not_when_off(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(
        fused_rows, "add_rms_norm", lambda x, add, w, eps: calls.append(("norm", eps)) or (x, x)
    )
    monkeypatch.setattr(fused_rows, "silu_mul", lambda g, u: calls.append(("silu",)) or g * u)
    layer = _layer()
    x = torch.randn(1, 2, 32)
    with torch.no_grad():
        DecoderRows(True).norm(layer.post_attention_layernorm, x, x)
        DecoderRows(True).mlp(layer.mlp, x)
        DecoderRows(False).norm(layer.post_attention_layernorm, x, x)
        DecoderRows(False).mlp(layer.mlp, x)
    assert calls == [("norm", layer.post_attention_layernorm.variance_epsilon), ("silu",)]
