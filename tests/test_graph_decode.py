"""The graph decode (`Options.decode="graph"`: dymu's own loop over `static_decode.StaticDecoder`)
against transformers' own decode, on CPU where its step runs eagerly (the same step a CUDA graph
replays): identical greedy tokens and matching scores for both families, stock and DyMU, batches
with left padding, answers that end early, and generate's keywords (min_new_tokens, processors,
eos/pad ids, sampling settings)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from legacy_family import FAMILY_DIRS, skip_without_legacy
from transformers import LogitsProcessor, LogitsProcessorList

import dymu
from dymu import decode_loop, generation, prefill_graph
from dymu.api import format_prompt
from dymu.matrix.golden import task_thresholds
from dymu.options import Options
from dymu.static_decode import StaticDecoder
from dymu.testing import shapes, tiny

KINDS = ("color", "count", "describe", "shape")  # prompts of different lengths: left padding


def _decode(model: dymu.DymuLlava, batch_args, decode: str, new: int, **kwargs):
    batch = generation.prepare(model.parts, *batch_args) if model.thresholds is not None else \
        generation.stock_prepare(model.parts, *batch_args[:2])  # fmt: skip
    return generation.generate_prepared(model.parts, batch, new, Options(decode=decode), **kwargs)


def _inputs(model: dymu.DymuLlava, n: int):
    pictures = [image for _, image in shapes.sample_pictures(n)]
    ids = [model.tokenize(format_prompt(shapes.QUESTIONS[KINDS[i % len(KINDS)]])) for i in range(n)]
    assert len({len(i) for i in ids}) > 1  # the batch is left-padded
    return ids, model.pixel_values(pictures), model.thresholds


@pytest.mark.parametrize("mode", ["stock", "dymu"])
@pytest.mark.parametrize("family", sorted(FAMILY_DIRS))
def test_graph_decode_equals_transformers_decode_on_the_trained_model(
    trained_checkpoints, family, mode
) -> None:
    """Answers that end at EOS at different steps: the same sequences (pads after EOS included)
    and the same scores as transformers' generate from the dynamic cache."""
    skip_without_legacy(family)
    model = dymu.load(trained_checkpoints[FAMILY_DIRS[family]],
                      thresholds=task_thresholds() if mode == "dymu" else None)  # fmt: skip
    args = _inputs(model, 4)
    ref = _decode(model, args, "dynamic", 12)
    out = _decode(model, args, "graph", 12)
    assert isinstance(out, decode_loop.DecodeOutput)
    assert torch.equal(out.sequences, ref.sequences)
    eos = model.tokenizer.eos_token_id
    new = out.sequences[:, -len(out.scores) :].tolist()
    ends = [row.index(eos) for row in new]
    assert len(set(ends)) > 1 and all(set(row[end + 1 :]) <= {0} for row, end in zip(new, ends, strict=True))
    assert len(out.scores) == len(ref.scores)
    for got, want in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILY_DIRS))
def test_graph_decode_runs_the_full_length_with_min_new_tokens(tiny_checkpoints, calibrated, family) -> None:
    """The random fixture (never at EOS by itself) with EOS suppressed for 6 steps, a custom
    processor that sees the ids so far, and explicit eos/pad ids."""
    skip_without_legacy(family)
    model = dymu.load(tiny_checkpoints[FAMILY_DIRS[family]], thresholds=calibrated)
    args = _inputs(model, 3)
    seen: dict[str, list[int]] = {}

    class Record(LogitsProcessor):
        def __init__(self, key: str) -> None:
            self.key = key

        def __call__(self, input_ids, scores):
            seen.setdefault(self.key, []).append(input_ids.shape[1])
            return scores

    kwargs = {"min_new_tokens": 6, "eos_token_id": [5, 6], "pad_token_id": 1}
    ref = _decode(model, args, "dynamic", 6, logits_processor=LogitsProcessorList([Record("ref")]), **kwargs)
    out = _decode(model, args, "graph", 6, logits_processor=LogitsProcessorList([Record("out")]), **kwargs)
    assert torch.equal(out.sequences, ref.sequences) and out.sequences.shape[1] == ref.sequences.shape[1]
    assert seen["out"] == seen["ref"] == [ref.sequences.shape[1] - 6 + i for i in range(6)]
    for got, want in zip(out.scores, ref.scores, strict=True):
        assert torch.isinf(got[:, [5, 6]]).all()  # EOS suppressed before min_new_tokens
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)


def test_a_second_call_reuses_the_decoder_and_forgets_the_first(trained_checkpoints) -> None:
    """The held buffers keep the last call's keys past the new prompt: the mask must hide them."""
    model = dymu.load(trained_checkpoints[tiny.HF_SAFETENSORS], thresholds=task_thresholds())
    args = _inputs(model, 2)
    first = _decode(model, args, "graph", 8)
    held = generation._static_decoders[model.parts.model]
    short = ([args[0][0][:]], args[1][:1], args[2])
    alone = _decode(model, short, "graph", 8)
    assert generation._static_decoders[model.parts.model] is not held  # batch 1: a new decoder
    again = _decode(model, args, "graph", 8)
    assert torch.equal(again.sequences, first.sequences)
    assert torch.equal(alone.sequences, _decode(model, short, "dynamic", 8).sequences)
    held = generation._static_decoders[model.parts.model]
    same = _decode(model, args, "graph", 8)
    assert generation._static_decoders[model.parts.model] is held  # same batch and length bucket: reused
    prompt = first.sequences.shape[1] - len(first.scores)
    assert held.key == (2, -(-(prompt + 8) // 128) * 128, torch.float32, "cpu")
    assert held.variant == (True, True, True)
    assert torch.equal(same.sequences, first.sequences)


# ---------------------------------------------------------------- StaticDecoder alone


def _decoder():
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=32, vocab_size=11)  # fmt: skip
    torch.manual_seed(0)
    decoder = LlamaModel(config).eval()
    return decoder, torch.nn.Linear(16, 11, bias=False)


def test_static_decoder_starts_after_the_prefill_and_advances() -> None:
    decoder, head = _decoder()
    step = StaticDecoder(decoder, head, 2, 8, 10000.0, torch.float32, torch.device("cpu"))
    keys = [torch.randn(2, 2, 3, 4) for _ in range(2)]
    values = [torch.randn(2, 2, 3, 4) for _ in range(2)]
    valid = torch.tensor([[False, True, True], [True, True, True]])
    step.load(keys, values, valid)
    assert step.index.tolist() == [3] and step.positions.tolist() == [[2], [3]]
    assert torch.equal(step.keys[1, :, :, :3], keys[1]) and torch.equal(step.values[0, :, :, :3], values[0])
    floor = torch.finfo(torch.float32).min
    assert step.mask[0, 0, 0].tolist() == [floor, 0, 0] + [floor] * 5
    logits = step.step(torch.tensor([[4], [5]]))
    assert logits.shape == (2, 11) and logits.dtype == torch.float32
    assert step.index.tolist() == [4] and step.positions.tolist() == [[3], [4]]
    assert step.mask[1, 0, 0].tolist() == [0, 0, 0, 0] + [floor] * 4
    assert not torch.equal(step.keys[0, :, :, 3], torch.zeros(2, 2, 4))  # the new token's key is written
    with pytest.raises(ValueError, match="does not fit a 8-position decode buffer"):
        step.load(
            [torch.zeros(2, 2, 8, 4)] * 2, [torch.zeros(2, 2, 8, 4)] * 2, torch.ones(2, 8, dtype=torch.bool)
        )


def test_static_decoder_step_equals_the_decoders_own_forward() -> None:
    """One step after a prefill equals the decoder's full forward at that position (GQA, padding)."""
    decoder, head = _decoder()
    ids = torch.tensor([[0, 3, 4, 5, 6], [7, 8, 9, 1, 2]])
    attention = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        full = decoder(input_ids=ids, attention_mask=attention, position_ids=positions).last_hidden_state
        want = head(full[:, -1]).float()
        prefix = decoder(input_ids=ids[:, :-1], attention_mask=attention[:, :-1], position_ids=positions[:, :-1],
                         use_cache=True)  # fmt: skip
    keys, values = generation.cache_tensors(prefix.past_key_values)
    theta = generation.rope_theta(decoder.config)
    step = StaticDecoder(decoder, head, 2, 8, theta, torch.float32, torch.device("cpu"))
    step.load(keys, values, attention[:, :-1].bool())
    with torch.no_grad():
        got = step.step(ids[:, -1:])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- sampling


def test_warp_keeps_top_k_and_the_nucleus() -> None:
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    top2 = decode_loop.warp(scores, decode_loop.Sampling(True, top_k=2))
    assert torch.isinf(top2[0, [0, 2]]).all() and top2[0, 1] == 3.0 and top2[0, 3] == 2.0
    assert torch.equal(decode_loop.warp(scores, decode_loop.Sampling(True, temperature=2.0)), scores / 2)
    probs = scores.softmax(-1)[0]  # 0.032, 0.644, 0.087, 0.237
    nucleus = decode_loop.warp(scores, decode_loop.Sampling(True, top_p=0.7))
    assert torch.isfinite(nucleus[0]).tolist() == [False, True, False, True]  # 0.644 < 0.7 needs the next one
    assert probs[1] < 0.7 < probs[1] + probs[3]
    tiny_p = decode_loop.warp(scores, decode_loop.Sampling(True, top_p=0.01))
    assert torch.isfinite(tiny_p[0]).tolist() == [False, True, False, False]  # the top token always stays


def test_sampling_settings_fall_back_to_the_generation_config() -> None:
    config = type("Config", (), {"do_sample": False, "temperature": 0.5, "top_k": 50, "top_p": None})()
    assert decode_loop.sampling_from({}, config) == decode_loop.Sampling()
    assert decode_loop.sampling_from({"do_sample": True, "top_p": 0.9}, config) == decode_loop.Sampling(
        True, 0.5, 50, 0.9)  # fmt: skip
    assert decode_loop.sampling_from({"do_sample": True}, None) == decode_loop.Sampling(True, 1.0, 0, 1.0)


def test_sampling_draws_only_from_what_survives() -> None:
    torch.manual_seed(0)
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).expand(400, 4)
    drawn = decode_loop.next_tokens(scores, decode_loop.Sampling(True, top_k=2))
    assert set(drawn.tolist()) == {1, 3}
    counts = torch.bincount(drawn, minlength=4).float() / 400
    assert abs(counts[1] - math.exp(3) / (math.exp(3) + math.exp(2))) < 0.08
    assert decode_loop.next_tokens(scores[:1], decode_loop.Sampling()).tolist() == [1]


def test_graph_decode_samples_with_a_seed(trained_checkpoints) -> None:
    model = dymu.load(trained_checkpoints[tiny.HF_SAFETENSORS])
    model.options = dataclasses.replace(model.options, decode="graph")
    picture = shapes.sample_pictures(1)[0][1]
    prompt = format_prompt(shapes.QUESTIONS["describe"])
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(
            model.generate(prompt, picture, max_new_tokens=6, do_sample=True, temperature=1.5)[0].token_ids
        )
    assert runs[0] == runs[1]
    greedy = model.generate(prompt, picture, max_new_tokens=6, do_sample=True, top_k=1)[0].token_ids
    assert greedy == model.generate(prompt, picture, max_new_tokens=6)[0].token_ids


def test_prepare_packs_rows_and_matches_the_padded_prefill(trained_checkpoints, monkeypatch) -> None:
    """A batch's DyMU prefill runs on packed rows; the padded layout (which the deterministic
    remerge keeps) gives the same keys and values."""
    model = dymu.load(trained_checkpoints[tiny.HF_SAFETENSORS], thresholds=task_thresholds())
    ids, pixels, tau = _inputs(model, 4)
    shapes_seen = []
    real = generation.vtu_prefill

    def recording(decoder, merged, *args, **kwargs):
        shapes_seen.append(tuple(merged.shape[:2]))
        return real(decoder, merged, *args, **kwargs)

    monkeypatch.setattr(generation, "vtu_prefill", recording)
    packed = generation.prepare(model.parts, ids, pixels, tau)
    padded = generation.prepare(model.parts, ids, pixels, tau, options=Options(deterministic_remerge=True))
    rows = [
        len(i) - 2 + n for i, n in zip(ids, packed.visual_tokens, strict=True)
    ]  # no <image>, no last token
    bucket = prefill_graph.BUCKET  # packed rows are rounded up to a bucket (a few GEMM shapes)
    assert shapes_seen == [(1, -(-(1 + sum(rows)) // bucket) * bucket), (4, 1 + max(rows))]  # dump row, rows
    assert len(set(packed.visual_tokens)) > 1  # rows of different lengths
    for got_layers, want_layers in zip(packed.tensors(), padded.tensors(), strict=True):
        for got, want in zip(got_layers, want_layers, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_row_buckets_change_no_key_or_value(trained_checkpoints, monkeypatch) -> None:
    """The 64-row buckets (zero rows after the packed prefill rows, and after each image's merged
    features for the projector) change nothing a decode reads: the same keys and values as without
    buckets, on merged lengths that are not multiples of the bucket."""
    model = dymu.load(trained_checkpoints[tiny.HF_SAFETENSORS], thresholds=task_thresholds())
    ids, pixels, tau = _inputs(model, 4)
    bucketed = generation.prepare(model.parts, ids, pixels, tau)
    assert any(n % prefill_graph.BUCKET for n in bucketed.visual_tokens), "the projector bucket must pad"
    monkeypatch.setattr(prefill_graph, "BUCKET", 1)
    plain = generation.prepare(model.parts, ids, pixels, tau)
    for got_layers, want_layers in zip(bucketed.tensors(), plain.tensors(), strict=True):
        for got, want in zip(got_layers, want_layers, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_static_decoder_keeps_the_models_dtype_and_refuses_mismatched_layers() -> None:
    decoder, head = _decoder()
    decoder, head = decoder.to(torch.bfloat16), head.to(torch.bfloat16)
    step = StaticDecoder(decoder, head, 1, 8, 10000.0, torch.bfloat16, torch.device("cpu"))
    assert step.keys.dtype == step.values.dtype == step.mask.dtype == torch.bfloat16
    assert (
        step.positions.dtype == step.index.dtype == torch.long and step.captures == 0 and step.graph is None
    )
    kv = [torch.randn(1, 2, 3, 4, dtype=torch.bfloat16) for _ in range(2)]
    step.load(kv, kv, torch.ones(1, 3, dtype=torch.bool))
    logits = step.step(torch.tensor([[4]]))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert step.captures == 0  # no graph off-GPU
    with pytest.raises(ValueError, match="zip"):
        step.load(kv, kv[:1], torch.ones(1, 3, dtype=torch.bool))


class _Scripted:
    """A stand-in step: call t gives row b a logit of 1 at token script[t][b] (0 elsewhere)."""

    def __init__(self, script: list[list[int]], vocab: int = 6) -> None:
        self.ids = torch.zeros(len(script[0]), 1, dtype=torch.long)
        self.script, self.vocab, self.fed = script, vocab, []

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        self.fed.append(ids.view(-1).tolist())
        logits = torch.zeros(len(ids), self.vocab)
        logits[torch.arange(len(ids)), torch.tensor(self.script[len(self.fed) - 1])] = 1.0
        return logits


def test_run_stops_pads_and_scores_as_generate_does() -> None:
    prompt = torch.tensor([[7, 8], [7, 5]])
    steps = _Scripted([[3, 1], [1, 2], [4, 3], [0, 0]])
    out = decode_loop.run(steps, prompt, 10, {3}, pad_token_id=9)
    assert out.sequences.tolist() == [[7, 8, 3, 9, 9], [7, 5, 1, 2, 3]]  # row 0 ends at once, row 1 at step 3
    assert out.scores is None and steps.fed == [
        [8, 5],
        [3, 1],
        [9, 2],
    ]  # fed: the last prompt token, then picks
    scored = decode_loop.run(_Scripted([[3, 1], [1, 2], [4, 3]]), prompt, 2, {3}, 9, output_scores=True)
    assert scored.sequences.shape[1] == 4 and len(scored.scores) == 2  # max_new_tokens ends it
    held = decode_loop.run(_Scripted([[3, 3], [3, 3], [3, 2]]), prompt, 3, {3}, 9, min_new_tokens=2,
                           output_scores=True)  # fmt: skip
    assert held.sequences[:, 2:].tolist() == [[0, 0, 3], [0, 0, 2]]  # EOS masked for two steps (ties: id 0)
    assert torch.isinf(held.scores[0][:, 3]).all() and not torch.isinf(held.scores[2]).any()
    no_eos = decode_loop.run(_Scripted([[3, 3], [3, 3]]), prompt, 2, set(), 9)
    assert no_eos.sequences[:, 2:].tolist() == [[3, 3], [3, 3]]


def test_warp_edges() -> None:
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    one = decode_loop.warp(scores, decode_loop.Sampling(True, top_k=1))
    assert torch.isfinite(one[0]).tolist() == [False, True, False, False]
    assert one[0, 0] == -math.inf
    sure = torch.tensor([[0.0, -100.0, -100.0]])  # the cumulative mass reaches 1.0 after the first token
    assert torch.isfinite(decode_loop.warp(sure, decode_loop.Sampling(True, top_p=1.0))).all()
    even = torch.tensor([[1.0, 1.0, -50.0]])  # 0.5 / 0.5: top_p 0.5 is reached by the first token alone
    half = decode_loop.warp(even, decode_loop.Sampling(True, top_p=0.5))[0]
    assert half[0] == 1.0 and half[1] == half[2] == -math.inf
    config = type("Config", (), {"do_sample": True, "temperature": None, "top_k": None, "top_p": None})()
    assert decode_loop.sampling_from({}, config) == decode_loop.Sampling(True, 1.0, 0, 1.0)
    assert decode_loop.sampling_from({"do_sample": False}, config) == decode_loop.Sampling()
    assert decode_loop.sampling_from({}, None) == decode_loop.Sampling()  # no generation config: greedy


# ---------------------------------------------------------------- prepare / stock_prepare contracts


@pytest.mark.parametrize("mode", ["stock", "dymu"])
def test_prefills_mark_the_vision_edge_once_and_report_their_tokens(trained_checkpoints, mode) -> None:
    model = dymu.load(trained_checkpoints[tiny.HF_SAFETENSORS], thresholds=task_thresholds())
    ids, pixels, tau = _inputs(model, 3)
    marks: list[str] = []
    if mode == "stock":
        batch = generation.stock_prepare(model.parts, ids, pixels, on_stage=marks.append)
        patches = (model.parts.vision.config.image_size // model.parts.vision.config.patch_size) ** 2
        assert batch.tower is None and batch.visual_tokens == [patches] * 3
    else:
        batch = generation.prepare(model.parts, ids, pixels, tau, on_stage=marks.append)
        assert batch.tower is not None and batch.visual_tokens == [int(n) for n in batch.tower.num_tokens]
        assert all(0 < n < 64 for n in batch.visual_tokens)
    assert marks == ["vision"]
    assert batch.model is model.parts.model


def test_prepare_refuses_an_unknown_vtu_and_passes_its_options_on(trained_checkpoints, monkeypatch) -> None:
    model = dymu.load(trained_checkpoints[tiny.HF_SAFETENSORS], thresholds=task_thresholds())
    ids, pixels, tau = _inputs(model, 2)
    with pytest.raises(dymu.DymuError) as err:
        generation.prepare(model.parts, ids, pixels, tau, vtu="half")
    assert str(err.value) == "vtu='half' is not one of fast, none"
    seen = []
    real = generation.vtu_prefill

    def recording(*args, **kwargs):
        seen.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(generation, "vtu_prefill", recording)
    options = Options(fused_rope=False, deterministic_remerge=True)
    generation.prepare(model.parts, ids, pixels, tau, options=options)
    assert seen == [options]


def test_stock_prepare_asks_for_a_cache_whatever_the_config_says(trained_checkpoints) -> None:
    model = dymu.load(trained_checkpoints[tiny.HF_SAFETENSORS])
    ids, pixels, _ = _inputs(model, 2)
    model.parts.decoder.config.use_cache = False
    batch = generation.stock_prepare(model.parts, ids, pixels)
    keys, _ = batch.tensors()
    assert keys[0].shape[2] == batch.virtual_ids.shape[1] - 1


def test_each_switch_set_keeps_its_own_captured_step_over_the_same_buffers(monkeypatch) -> None:
    """Switching fused kernels on and off (as a benchmark's modes do) swaps captured steps and keeps
    the buffers; a switch set whose capture failed stays eager, the others keep their graphs."""
    import dymu.static_decode as static_decode

    captured: list[object] = []

    class FakeCapture:
        def __init__(self, fn, example, pool) -> None:
            captured.append(self)

    decoder, head = _decoder()
    step = StaticDecoder(decoder, head, 1, 8, 10000.0, torch.float32, torch.device("cpu"))
    keys = step.keys
    monkeypatch.setattr(static_decode, "CapturedCall", FakeCapture)
    step._capture()
    first = step.graph
    assert first is captured[0] and step.captures == 1 and step.graphs == {(True, True, True): first}
    step.use(True, True, False)
    assert step.graph is None and step.variant == (True, True, False)

    def refuse(*args, **kwargs):
        raise RuntimeError("capture refused")

    monkeypatch.setattr(static_decode, "CapturedCall", refuse)
    with pytest.warns(RuntimeWarning, match="capture refused"):
        step._capture()
    assert step.graphs[(True, True, False)] is None and not step.use_graph and step.captures == 1
    step.use(True, True, True)
    assert step.graph is first and step.keys is keys
    step.use(True, True, False)
    assert step.graph is None and not step.use_graph  # no second try, no second warning


def test_switching_kernels_reuses_the_held_decoder(trained_checkpoints) -> None:
    model = dymu.load(trained_checkpoints[tiny.HF_SAFETENSORS], thresholds=task_thresholds())
    args = _inputs(model, 2)
    first = _decode(model, args, "graph", 8)
    held = generation._static_decoders[model.parts.model]
    batch = generation.prepare(model.parts, *args)
    plain = generation.generate_prepared(
        model.parts, batch, 8, Options(decode="graph", fused_rope=False, fused_rows=False)
    )
    assert generation._static_decoders[model.parts.model] is held and held.variant == (True, False, False)
    assert torch.equal(plain.sequences, first.sequences)


def test_a_held_decoder_somewhat_longer_than_needed_is_kept(trained_checkpoints) -> None:
    """Prompts straddling a bucket edge keep one buffer (and the graphs tied to it); a much longer
    one, another batch size or dtype gets a new decoder."""
    model = dymu.load(trained_checkpoints[tiny.HF_SAFETENSORS])

    def held(batch: int, length: int, dtype=torch.float32) -> StaticDecoder:
        return generation.static_decoder_for(
            model.parts, batch, length, dtype, torch.device("cpu"), graphs=False
        )

    first = held(1, 300)
    assert first.length == 384
    assert held(1, 200) is first and held(1, 100) is first  # 384 <= 128 + DECODER_SLACK
    longer = held(1, 400)
    assert longer.length == 512 and held(1, 500) is longer
    assert held(1, 100).length == 128  # 512 > 128 + 256: a step would read too much masked tail
    assert held(2, 100).batch == 2 and held(2, 100, torch.float16).dtype == torch.float16
    assert generation.DECODER_SLACK == 2 * generation.STATIC_CACHE_BUCKET
