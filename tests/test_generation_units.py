"""generation.py's helpers without a LLaVA model (fast; the generation mutation group runs them
per mutant): the prefill mask over the virtual sequence, the decode-path choice, the static cache
held per model (bucketed length, reuse) and what `generate_prepared` hands to generate."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from dymu import generation
from dymu.compat.shims import cache_keyword
from dymu.errors import DymuError
from dymu.options import Options
from dymu.vtu import additive_mask


class _Model:
    """A weak-referenceable stand-in for parts.model (no `_supports_cache_class`: cache classes ok)."""


def _parts(device: str = "cpu", max_positions: int | None = 4096, model=None) -> SimpleNamespace:
    config = SimpleNamespace(hidden_size=8)
    if max_positions is not None:
        config.max_position_embeddings = max_positions
    weight = SimpleNamespace(device=SimpleNamespace(type=device))
    return SimpleNamespace(model=model if model is not None else _Model(),
                           decoder=SimpleNamespace(config=config, embed_tokens=SimpleNamespace(weight=weight)))  # fmt: skip


def _kv(bsz: int = 2, n: int = 5, dtype: torch.dtype = torch.float32):
    return [torch.zeros(bsz, 1, n, 4, dtype=dtype)], [torch.ones(bsz, 1, n, 4, dtype=dtype)]


# ---------------------------------------------------------------- virtual_mask


def test_virtual_mask_is_the_decoders_causal_padding_mask_made_additive() -> None:
    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, intermediate_size=16,
                         vocab_size=10)  # fmt: skip
    decoder = LlamaModel(config)
    valid = torch.tensor([[False, True, True, True], [True, True, True, True]])
    allowed = torch.ones(4, 4, dtype=torch.bool).tril()[None, None] & valid[:, None, None]
    for dtype in (torch.float32, torch.bfloat16):
        mask = generation.virtual_mask(decoder, valid, dtype)
        assert mask.dtype == dtype and torch.equal(mask, additive_mask(allowed, dtype))


# ---------------------------------------------------------------- decode_path


def test_decode_path_follows_the_option_then_the_device(monkeypatch) -> None:
    monkeypatch.setattr(generation, "static_cache_supported", lambda model: None)  # a StaticCache (>= 4.38)
    assert generation.decode_path(_parts(), Options(decode="dynamic")) == ("dynamic", "asked for")
    assert generation.decode_path(_parts(), Options(decode="static")) == ("static", "asked for")
    assert generation.decode_path(_parts(), Options(decode="graph")) == ("graph", "asked for")
    assert generation.decode_path(_parts("cuda"), Options(decode="dynamic")) == ("dynamic", "asked for")
    assert generation.decode_path(_parts()) == (
        "dynamic", "auto: the fast decode paths pay off on CUDA; this model is on the CPU"
    )  # fmt: skip
    graph = ("graph", "auto: CUDA (every step one replayed graph over a static KV buffer)")
    assert generation.decode_path(_parts("cuda")) == graph
    handled = {
        "logits_processor": [],
        "min_new_tokens": 2,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    assert generation.decode_path(_parts("cuda"), kwargs=handled) == graph
    assert generation.decode_path(_parts("cuda"), kwargs={"num_beams": 2, "top_k": 5}) == (
        "static", "auto: the graph decode does not implement num_beams")  # fmt: skip


def test_decode_path_refuses_graph_for_what_the_loop_does_not_implement() -> None:
    with pytest.raises(DymuError) as err:
        generation.decode_path(
            _parts("cuda"), Options(decode="graph"), {"repetition_penalty": 1.2, "num_beams": 2}
        )
    assert str(err.value) == ("decode='graph' does not implement num_beams, repetition_penalty; use "
                              "decode='static' or 'dynamic' (transformers' own decode)")  # fmt: skip


def test_decode_path_without_a_static_cache(monkeypatch) -> None:
    monkeypatch.setattr(generation, "static_cache_supported", lambda model: "no StaticCache here")
    assert generation.decode_path(_parts("cuda"))[0] == "graph"  # dymu's own buffer needs no StaticCache
    assert generation.decode_path(_parts("cuda"), kwargs={"num_beams": 2}) == (
        "dynamic", "auto: the graph decode does not implement num_beams, and no StaticCache here")  # fmt: skip
    assert generation.decode_path(_parts("cuda"), Options(decode="dynamic")) == ("dynamic", "asked for")
    with pytest.raises(DymuError) as err:
        generation.decode_path(_parts("cuda"), Options(decode="static"))
    assert str(err.value) == "decode='static': no StaticCache here; use decode='dynamic' or 'graph'"


# ---------------------------------------------------------------- _static_cache_for


@pytest.fixture
def built(monkeypatch):
    calls = []

    def static_cache(config, keys, values, max_len, valid, reuse=None):
        calls.append({"config": config, "keys": keys, "values": values, "max_len": max_len, "valid": valid,
                      "reuse": reuse})  # fmt: skip
        return SimpleNamespace(number=len(calls))

    monkeypatch.setattr(generation, "static_cache", static_cache)
    return calls


@pytest.mark.parametrize(("length", "limit", "max_len"),
                         [(5, 4096, 128), (128, 4096, 128), (129, 4096, 256), (130, 200, 200), (130, 100, 130),
                          (130, None, 130)])  # fmt: skip
def test_the_static_cache_length_is_bucketed_within_the_context(built, length, limit, max_len) -> None:
    parts = _parts(max_positions=limit)
    keys, values = _kv()
    valid = torch.ones(2, 5, dtype=torch.bool)
    cache = generation._static_cache_for(parts, keys, values, length, valid)
    (call,) = built
    assert call["max_len"] == max_len and call["reuse"] is None and call["valid"] is valid
    assert call["config"] is parts.decoder.config and call["keys"] is keys and call["values"] is values
    assert generation._static_caches[parts.model][1] is cache


def test_the_static_cache_is_reused_only_for_the_same_shape(built) -> None:
    parts = _parts()
    first = generation._static_cache_for(parts, *_kv(), 20, None)
    second = generation._static_cache_for(parts, *_kv(), 100, None)  # same bucket
    assert built[1]["reuse"] is first
    for keys, values, length in (
        (*_kv(bsz=3), 100),  # batch size
        (*_kv(), 200),  # bucket
        (*_kv(dtype=torch.float64), 100),  # dtype
    ):
        generation._static_cache_for(parts, keys, values, length, None)
        assert built[-1]["reuse"] is None
    assert second.number == 2 and len(built) == 5
    other = _parts()
    generation._static_cache_for(other, *_kv(), 100, None)  # one cache per model
    assert built[-1]["reuse"] is None and generation._static_caches[parts.model][1].number == 5


# ---------------------------------------------------------------- generate_prepared


@pytest.fixture
def generate_calls(monkeypatch):
    calls = []

    class Mixin:
        @staticmethod
        def generate(model, **kwargs):
            calls.append((model, kwargs))
            return "generated"

    monkeypatch.setattr(generation, "GenerationMixin", Mixin)
    return calls


def _batch(prompt: int = 6) -> generation.PreparedBatch:
    mask = torch.ones(2, prompt, dtype=torch.long)
    mask[0, 0] = 0
    return generation.PreparedBatch("the cache", torch.arange(2 * prompt).view(2, prompt), mask, [3, 4], None)


def test_generate_prepared_hands_generate_the_batch_and_greedy_settings(generate_calls) -> None:
    parts, batch = _parts(), _batch()
    assert generation.generate_prepared(parts, batch, 3) == "generated"
    ((model, kwargs),) = generate_calls
    assert model is parts.model
    assert kwargs == {"input_ids": batch.virtual_ids, "attention_mask": batch.attention_mask,
                      cache_keyword(): "the cache", "max_new_tokens": 3, "do_sample": False,
                      "return_dict_in_generate": True, "output_scores": True, "pad_token_id": 0}  # fmt: skip
    generation.generate_prepared(parts, batch, 2, eos_token_id=7, pad_token_id=5, min_new_tokens=2)
    kwargs = generate_calls[-1][1]
    assert (kwargs["eos_token_id"], kwargs["pad_token_id"], kwargs["min_new_tokens"]) == (7, 5, 2)


def test_generate_prepared_decodes_from_a_static_copy_when_asked(generate_calls, built, monkeypatch) -> None:
    monkeypatch.setattr(generation, "static_cache_supported", lambda model: None)
    keys, values = _kv(n=5)
    parts, batch = _parts(), _batch(prompt=6)
    batch.kv = ((keys[0], values[0]),)  # the tuple form every stack's cache_tensors reads
    generation.generate_prepared(parts, batch, 3, Options(decode="static"))
    (call,) = built
    assert call["keys"][0] is keys[0] and call["values"][0] is values[0] and call["max_len"] == 128
    assert torch.equal(call["valid"], batch.attention_mask[:, :-1])
    assert generate_calls[-1][1][cache_keyword()].number == 1
    generation.generate_prepared(parts, batch, 3, Options(decode="dynamic"))
    assert generate_calls[-1][1][cache_keyword()] is batch.cache and len(built) == 1
    generation.generate_prepared(parts, batch, 130, Options(decode="static"))  # 6 + 130 -> the 256 bucket
    assert built[-1]["max_len"] == 256


@pytest.mark.parametrize("new", [0, -1, 2.0, "3", None])
def test_generate_prepared_refuses_a_token_count_that_is_not_positive(generate_calls, new) -> None:
    with pytest.raises(DymuError) as err:
        generation.generate_prepared(_parts(), _batch(), new)
    assert str(err.value) == f"max_new_tokens={new!r}: must be a positive integer"
    assert generate_calls == []


def test_generate_prepared_refuses_to_run_past_the_context(generate_calls) -> None:
    generation.generate_prepared(_parts(max_positions=10), _batch(prompt=6), 4)  # exactly the context
    generation.generate_prepared(_parts(max_positions=None), _batch(prompt=6), 400)  # no limit known
    assert len(generate_calls) == 2
    with pytest.raises(DymuError) as err:
        generation.generate_prepared(_parts(max_positions=10), _batch(prompt=6), 5)
    assert str(err.value) == ("max_new_tokens=5: the prompt is 6 positions (text + image) and the model's "
                              "context is 10; ask for at most 4 new tokens")  # fmt: skip
    with pytest.raises(DymuError, match="ask for at most 0 new tokens"):
        generation.generate_prepared(_parts(max_positions=4), _batch(prompt=6), 1)


@pytest.mark.parametrize("prefill", [generation.prepare, generation.stock_prepare])
def test_both_prefills_refuse_a_prompt_count_unlike_the_image_count(prefill) -> None:
    """Checked before the model is touched: three prompts, two 3-channel images."""
    with pytest.raises(DymuError) as err:
        prefill(
            None, [[1], [2], [3]], torch.zeros(2, 3, 4, 4), *([None] if prefill is generation.prepare else [])
        )
    assert str(err.value) == "3 prompts but 2 images"
