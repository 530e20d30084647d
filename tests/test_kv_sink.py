"""The prefill writes its keys and values straight into the graph decode's buffer (a K/V sink):
the same values as the plain prefill at the same positions, no copy when the decode loads them,
the same greedy tokens, and a batch that refuses use once something else filled the buffer."""

from __future__ import annotations

import pytest
import torch
from legacy_family import FAMILY_DIRS, skip_without_legacy
from test_graph_decode import _inputs
from test_vtu_core import small_llama

import dymu
from dymu import api, generation, prefill_graph, static_decode
from dymu.api import format_prompt
from dymu.compat.shims import rope_theta
from dymu.errors import DymuError
from dymu.matrix.golden import task_thresholds
from dymu.options import Options
from dymu.prefill_graph import graphed_vtu_prefill
from dymu.static_decode import StaticDecoder
from dymu.testing import shapes
from dymu.vtu import head_dim, vtu_prefill

UNTOUCHED = 7.0  # what a sink holds where no prefill should write


def _sink(model, bsz: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    config = model.config
    shape = (len(model.layers), bsz, config.num_key_value_heads, length, head_dim(config))
    return torch.full(shape, UNTOUCHED), torch.full(shape, UNTOUCHED)


def _example(n_u: int = 9, n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    merged = torch.randn(1, n_u, 64)
    merged[:, 0] = 0  # prepare's dump row
    idx = torch.randint(1, n_u, (1, n)).sort(dim=1).values
    return merged, idx


def test_vtu_prefill_writes_into_the_sink_and_nothing_past_its_length() -> None:
    model = small_llama()
    merged, idx = _example()
    theta = rope_theta(model.config)
    plain = vtu_prefill(model, merged, idx, theta)
    sink = _sink(model, 1, 50)
    into = vtu_prefill(model, merged, idx, theta, sink=sink)
    assert torch.equal(into.hidden, plain.hidden)
    for i, (k, v) in enumerate(zip(into.keys, into.values, strict=True)):
        assert (
            k.data_ptr() == sink[0][i].data_ptr() and v.data_ptr() == sink[1][i].data_ptr()
        )  # views, no copy
        assert torch.equal(k, plain.keys[i]) and torch.equal(v, plain.values[i])
    assert bool((sink[0][..., 40:, :] == UNTOUCHED).all()) and bool((sink[1][..., 40:, :] == UNTOUCHED).all())


def test_a_sink_of_the_wrong_shape_is_refused() -> None:
    model = small_llama()
    merged, idx = _example()
    theta = rope_theta(model.config)
    with pytest.raises(ValueError, match="K/V sink"):
        vtu_prefill(model, merged, idx, theta, sink=_sink(model, 1, 39))  # shorter than the prefill
    with pytest.raises(ValueError, match="K/V sink"):
        vtu_prefill(model, merged, idx, theta, sink=_sink(model, 2, 64))  # another batch size


@pytest.mark.parametrize("fused", [False, True])
def test_graphed_prefill_writes_real_positions_in_place(fused: bool) -> None:
    """The virtual padding goes after the real positions: position p lands at p, the padding up to
    the bucket (40 -> 64) is written too, and nothing past it."""
    model = small_llama()
    merged, idx = _example()
    theta, options = rope_theta(model.config), Options(fused_rope=fused)
    plain = vtu_prefill(model, merged, idx, theta, options=options)
    sink = _sink(model, 1, 80)
    into = graphed_vtu_prefill(model, merged, idx, theta, options=options, sink=sink)
    for i in range(len(model.layers)):
        assert into.keys[i].data_ptr() == sink[0][i].data_ptr()
        torch.testing.assert_close(into.keys[i], plain.keys[i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(into.values[i], plain.values[i], rtol=1e-5, atol=1e-5)
    assert bool(
        (sink[0][..., 40:64, :] != UNTOUCHED).any()
    )  # the bucket's padding: why a sink must be that long
    assert bool((sink[0][..., 64:, :] == UNTOUCHED).all())
    torch.testing.assert_close(into.hidden, plain.hidden, rtol=1e-5, atol=1e-5)


def test_a_new_sink_drops_the_graphs_that_wrote_into_the_old_one() -> None:
    """A captured graph writes raw addresses: once its sink may be freed it must never replay."""
    state = prefill_graph._DecoderGraphs()
    old, new, own = (
        ("sink", 1, 2, (4,), "cuda:0"),
        ("sink", 3, 4, (4,), "cuda:0"),
        ("own", (4,), None, "cuda:0"),
    )
    state.adopt_sink(old)
    for key in (old, own):
        state.graphs.calls[(key, 64)] = object()
    state.adopt_sink(old)  # the same sink again: its graphs stay
    assert set(state.graphs.calls) == {(old, 64), (own, 64)}
    state.adopt_sink(new)
    assert set(state.graphs.calls) == {(own, 64)}


def _decoder(model, length: int = 64) -> StaticDecoder:
    torch.manual_seed(9)  # the same LM head for every decoder of a test
    return StaticDecoder(model, torch.nn.Linear(64, 11, bias=False), 1, length, rope_theta(model.config),
                         torch.float32, torch.device("cpu"), graphs=False, fused_rope=False, fused_rows=False)  # fmt: skip


def test_a_loaded_sink_is_not_copied_and_goes_stale_after_the_next_fill() -> None:
    model = small_llama()
    merged, idx = _example()
    theta = rope_theta(model.config)
    step, reference = _decoder(model), _decoder(model)
    sink, current = step.sink()
    into = vtu_prefill(model, merged, idx, theta, sink=sink)
    plain = vtu_prefill(model, merged, idx, theta)
    valid = torch.ones(1, 40, dtype=torch.bool)
    assert step.holds(into.keys, into.values) and not step.holds(plain.keys, plain.values)
    step.load(into.keys, into.values, valid)
    reference.load(plain.keys, plain.values, valid)
    assert current()  # loading its own positions copied nothing and changed nothing
    ids = torch.tensor([[5]])
    for _ in range(3):
        logits = step.step(ids)
        torch.testing.assert_close(logits, reference.step(ids), rtol=1e-5, atol=1e-5)
        ids = logits.argmax(-1, keepdim=True)
    step.load(plain.keys, plain.values, valid)  # someone else's prefill copied in
    assert not current()
    _, later = step.sink()
    assert later() and not current()


def test_capturing_the_decode_step_puts_back_what_its_warm_up_wrote(monkeypatch: pytest.MonkeyPatch) -> None:
    """The capture's warm-up runs two real steps (positions 0 and 1); a prefill already written into
    the buffer through the sink must survive it. (A stand-in capture runs the warm-up on the CPU.)"""

    class WarmUpOnly:
        def __init__(self, fn, example, pool) -> None:
            for _ in range(2):
                fn(*example)
            self.fn = fn

        def __call__(self, *inputs):
            return self.fn(*inputs)

    monkeypatch.setattr(static_decode, "CapturedCall", WarmUpOnly)
    model = small_llama()
    merged, idx = _example()
    step = _decoder(model)
    sink, current = step.sink()
    vtu_prefill(model, merged, idx, rope_theta(model.config), sink=sink)
    before = (step.keys.clone(), step.values.clone())
    step._capture()
    assert step.captures == 1 and current()
    assert torch.equal(step.keys, before[0]) and torch.equal(step.values, before[1])


def _assert_sunk_like_own(model, own, ref, prepare_sunk, options: Options):
    """The batch `prepare_sunk()` makes (with decode_tokens=10) sits in the held decode buffer, bit for
    bit `own`'s keys and values, and decodes `ref`'s tokens (`ref`: `own` decoded, which copied its
    keys and values into that buffer; they are overwritten first, so only the sink can put them
    back). Returns the decode state and the batch."""
    step = generation._static_decoders[model.parts.model]
    step.keys.fill_(UNTOUCHED)
    step.values.fill_(UNTOUCHED)
    sunk = prepare_sunk()
    assert generation._static_decoders[model.parts.model] is step
    assert step.holds(*sunk.tensors())
    for a, b in zip(own.tensors()[0] + own.tensors()[1], sunk.tensors()[0] + sunk.tensors()[1], strict=True):
        assert torch.equal(a, b)
    out = generation.generate_prepared(model.parts, sunk, 10, options)
    assert torch.equal(out.sequences, ref.sequences)
    return step, sunk


@pytest.mark.parametrize("family", sorted(FAMILY_DIRS))
def test_prefill_into_the_decode_buffer_gives_the_same_tokens(trained_checkpoints, family) -> None:
    """A left-padded batch of 3 prepared with `decode_tokens`: the decode's buffer holds the keys and
    values (no copy at load), the greedy tokens equal a prepare with its own cache, and a later
    prepare into the same buffer makes the first batch refuse use."""
    skip_without_legacy(family)
    model = dymu.load(trained_checkpoints[FAMILY_DIRS[family]], thresholds=task_thresholds())
    ids, pixels, tau = _inputs(model, 3)
    options = Options(decode="graph")
    own = generation.prepare(model.parts, ids, pixels, tau, options=options)
    ref = generation.generate_prepared(model.parts, own, 10, options)
    step, sunk = _assert_sunk_like_own(
        model,
        own,
        ref,
        lambda: generation.prepare(model.parts, ids, pixels, tau, options=options, decode_tokens=10),
        options,
    )
    generation.prepare(model.parts, ids[:1] * 3, pixels[:1].expand(3, -1, -1, -1), tau, options=options,
                       decode_tokens=10)  # fmt: skip
    assert generation._static_decoders[model.parts.model] is step  # same buffer, overwritten
    with pytest.raises(DymuError, match="overwritten"):
        generation.generate_prepared(model.parts, sunk, 10, options)


@pytest.mark.parametrize("family", sorted(FAMILY_DIRS))
def test_the_stock_prefill_writes_into_the_decode_buffer_too(trained_checkpoints, family) -> None:
    """The stock baseline with `decode_tokens`: the decoder's own forward hands each layer to the
    SinkCache, the buffer holds the same keys and values as stock's DynamicCache (bit for bit: the
    attention is the same computation), and the greedy tokens are the same."""
    skip_without_legacy(family)
    model = dymu.load(trained_checkpoints[FAMILY_DIRS[family]], thresholds=task_thresholds())
    ids, pixels, _ = _inputs(model, 3)
    options = Options(decode="graph")
    own = generation.stock_prepare(model.parts, ids, pixels)
    ref = generation.generate_prepared(model.parts, own, 10, options)
    _, sunk = _assert_sunk_like_own(
        model,
        own,
        ref,
        lambda: generation.stock_prepare(model.parts, ids, pixels, decode_tokens=10, options=options),
        options,
    )
    generation.stock_prepare(model.parts, ids, pixels, decode_tokens=10, options=options)
    with pytest.raises(DymuError, match="overwritten"):
        generation.generate_prepared(model.parts, sunk, 10, options)


def test_a_stock_forward_that_bypasses_the_sink_cache_is_refused(trained_checkpoints, monkeypatch) -> None:
    """If a decoder never hands its keys and values to the cache (a transformers that stopped calling
    `Cache.update`), the buffer would hold stale values: stock_prepare says so instead of decoding."""
    model = dymu.load(trained_checkpoints[FAMILY_DIRS["hf"]], thresholds=task_thresholds())
    ids, pixels, _ = _inputs(model, 2)
    monkeypatch.setattr(generation.SinkCache, "update", lambda self, k, v, layer, *a, **kw: (k, v))
    with pytest.raises(DymuError, match="kv_sink=False"):
        generation.stock_prepare(model.parts, ids, pixels, decode_tokens=4, options=Options(decode="graph"))


def test_generate_prefills_into_the_graph_decode_and_answers_as_before(
    trained_checkpoints, monkeypatch
) -> None:
    """`DymuLlava.generate` on the graph path asks for the sink; its answers equal those of the same
    call with the sink turned off (the keys and values copied into the buffer at load)."""
    model = dymu.load(trained_checkpoints[FAMILY_DIRS["hf"]], thresholds=task_thresholds(),
                      options=Options(decode="graph"))  # fmt: skip
    pictures = [image for _, image in shapes.sample_pictures(2)]
    prompts = [format_prompt(shapes.QUESTIONS[kind]) for kind in ("color", "describe")]
    asked: list[int | None] = []
    real = generation.prepare

    def recording(*args, sink_off: bool = False, **kwargs):
        asked.append(kwargs.get("decode_tokens"))
        if sink_off:
            kwargs["decode_tokens"] = None
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "prepare", lambda *a, **k: recording(*a, sink_off=True, **k))
    want = model.generate(prompts, pictures, max_new_tokens=6)
    monkeypatch.setattr(api, "prepare", recording)
    got = model.generate(prompts, pictures, max_new_tokens=6)
    assert asked == [6, 6] and [a.token_ids for a in got] == [a.token_ids for a in want]
    assert any(len(a.token_ids) > 1 for a in got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("batch", [1, 3])
def test_on_cuda_the_sink_gives_the_copied_paths_keys_and_tokens(trained_checkpoints, batch: int) -> None:
    """On CUDA (batch 1: the replayed prefill graph writing into the decode buffer; batch 3: the
    eager prefill), twice in a row: the copied path's keys and values (to float32 rounding) and
    greedy tokens."""
    model = dymu.load(trained_checkpoints[FAMILY_DIRS["hf"]], thresholds=task_thresholds(), device="cuda")
    ids, pixels, tau = _inputs(model, 3)
    ids, pixels = ids[:batch], pixels[:batch]
    options = Options(decode="graph")
    own = generation.prepare(model.parts, ids, pixels, tau, options=options)
    keys, values = (list(t) for t in own.tensors())
    ref = generation.generate_prepared(model.parts, own, 10, options)
    for _ in range(2):  # the second replays the captured graphs
        sunk = generation.prepare(model.parts, ids, pixels, tau, options=options, decode_tokens=10)
        assert generation._static_decoders[model.parts.model].holds(*sunk.tensors())
        # batch 1 replays the same graph shapes either way: float32 rounding apart; the eager CUDA
        # batch is not reproducible even without the sink (the copied path twice in a row differed
        # by up to 0.024 on an H100, the sink by 0.019 from it), so there the tokens are the check
        tolerance = 1e-5 if batch == 1 else 5e-2
        for a, b in zip(keys + values, sunk.tensors()[0] + sunk.tensors()[1], strict=True):
            torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)
        out = generation.generate_prepared(model.parts, sunk, 10, options)
        assert torch.equal(out.sequences, ref.sequences)
