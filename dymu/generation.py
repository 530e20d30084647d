"""DyMU-LLaVA prefill and generation, for either family (docs/algorithm.md section 3).

Prefill: the DToMe tower merges the image, the projector maps the merged features, and
fast VTU runs the decoder on the merged sequence while attending at the virtual length
(text + 576 image positions). The resulting post-RoPE keys/values are the prefill; the final
prompt token (always text) is the decode's first input, which attends over them exactly as
VTU would for a singleton group. Decoding (`generate_prepared`) is dymu's graph loop over a
static buffer (`decode_loop`), or the model's own `generate` from a real transformers cache
of the installed version; no generate internals are touched.

Batches are left-padded in the virtual sequence, with positions `cumsum(mask) - 1` as
transformers' generate derives them; the merged rows are packed (see `prepare`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationMixin

from . import decode_loop
from .compat.shims import (
    SinkCache,
    cache_keyword,
    cache_tensors,
    causal_mask,
    new_cache,
    rope_theta,
    static_cache,
    static_cache_supported,
)
from .errors import DymuError
from .families import LlavaParts, split_at_image
from .options import DEFAULT, Options
from .prefill_graph import bucket_spare, graphed_vtu_prefill
from .static_decode import StaticDecoder
from .tower import TowerOutput, encode_images
from .vtu import additive_mask, vtu_prefill

VTU_MODES = ("fast", "none")
StageHook = Callable[[str], None]


@dataclass
class PrefillKV:
    """Per-layer post-RoPE keys and values (B, H_kv, N, hd) of a prefill, not yet in any cache."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    current: Callable[[], bool] | None = None  # borrowed from the prefill graph: still unchanged?


@dataclass
class PreparedBatch:
    """Everything a decode needs after a DyMU prefill of all but the last prompt token."""

    kv: Any  # PrefillKV, or a transformers cache (`cache` turns the former into the latter once)
    virtual_ids: torch.Tensor  # (B, N) left-padded; image positions hold parts.image_token_id
    attention_mask: torch.Tensor  # (B, N)
    visual_tokens: list[int]  # merged visual tokens per sample (what the LLM's row-wise layers see)
    tower: TowerOutput | None  # None for the stock prefill
    model: Any = None  # whose cache class `cache` builds

    @property
    def cache(self) -> Any:
        """The prefill as this transformers' cache, built on first use: the graph decode reads the
        tensors directly and never pays for the copy into a DynamicCache."""
        if isinstance(self.kv, PrefillKV):
            self._check_current()
            self.kv = new_cache(self.model, self.kv.keys, self.kv.values)
        return self.kv

    def tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer (keys, values), from wherever they are now."""
        if isinstance(self.kv, PrefillKV):
            self._check_current()
            return self.kv.keys, self.kv.values
        return cache_tensors(self.kv)

    def _check_current(self) -> None:
        current = self.kv.current
        if current is not None and not current():
            raise DymuError("this batch was prepared with borrow=True and a later prepare has overwritten its keys "
                            "and values; decode a borrowed batch before preparing the next one, or prepare it "
                            "without borrow")  # fmt: skip


def virtual_mask(decoder: torch.nn.Module, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, N, N) additive prefill mask over the virtual sequence: the decoder's own causal +
    padding mask from this transformers' masking API (docs/algorithm.md section 3, step 3), so VTU attends as
    stock LLaVA does."""
    bsz, n = valid.shape
    probe = torch.zeros(1, 1, decoder.config.hidden_size, dtype=dtype, device=valid.device).expand(bsz, n, -1)
    return additive_mask(causal_mask(decoder, probe, valid.long()).to(valid.device), dtype)


@torch.no_grad()
def prepare(
    parts: LlavaParts,
    prompt_ids: list[list[int]],
    pixel_values: torch.Tensor,
    thresholds: torch.Tensor | None,
    vtu: str = "fast",
    options: Options = DEFAULT,
    on_stage: StageHook | None = None,
    borrow: bool = False,
    decode_tokens: int | None = None,
) -> PreparedBatch:
    """Run the DyMU prefill for a batch of prompts (one image each) and fill the cache.

    `on_stage("vision")` is called once the merged features are projected, so a benchmark can
    mark the stage edge (the prefill ends when this returns). `borrow=True` (for a caller that
    decodes this batch before preparing another) lets a graphed prefill hand over its K/V buffer
    instead of a copy: one KV cache less at the peak; a later prepare makes the batch refuse use.
    `decode_tokens=n` (for a caller that decodes n new tokens on the graph path next) writes the
    keys and values straight into that decode's buffer: no KV cache of the prefill's own and no
    copy into the buffer (at batch 8 a 7B model's is 2.6 GB); the batch is borrowed from the buffer
    and refuses use once another prefill or decode has filled it."""
    if vtu not in VTU_MODES:
        raise DymuError(f"vtu={vtu!r} is not one of {', '.join(VTU_MODES)}")
    if len(prompt_ids) != pixel_values.shape[0]:
        raise DymuError(f"{len(prompt_ids)} prompts but {pixel_values.shape[0]} images")
    device = parts.decoder.embed_tokens.weight.device
    dtype = parts.decoder.embed_tokens.weight.dtype
    vision_dtype = next(parts.vision.parameters()).dtype
    tower = encode_images(parts.vision, pixel_values.to(device, vision_dtype), thresholds, parts.feature_layer,
                          options)  # fmt: skip
    # the projector's rows rounded up to a bucket: every new GEMM shape costs its first call several ms (cuBLAS
    # heuristics, kernel loading; 5-7 ms at batch 8 on an H100), and merged lengths change with every batch
    features = tower.padded.to(dtype)
    spare = bucket_spare(features.shape[1])
    projected = parts.projector(F.pad(features, (0, 0, 0, spare)))[:, : features.shape[1]]
    patches = tower.mapping[0].numel()
    if on_stage is not None:
        on_stage("vision")

    merged_rows, idx_rows, virtual_ids = [], [], []
    for i, ids in enumerate(prompt_ids):
        before, after = split_at_image(ids)
        n_m = int(tower.num_tokens[i])
        image_idx = tower.mapping[i].to(device) if vtu == "fast" else torch.arange(n_m, device=device)
        text = torch.tensor(before + after, device=device)
        embeds = parts.decoder.embed_tokens(text)
        k = len(before)
        merged_rows.append(torch.cat([embeds[:k], projected[i, :n_m], embeds[k:]]))
        idx_rows.append(
            torch.cat(
                [
                    torch.arange(k, device=device),
                    k + image_idx,
                    k + n_m + torch.arange(len(after), device=device),
                ]
            )
        )
        n_image = patches if vtu == "fast" else n_m
        virtual_ids.append(before + [parts.image_token_id] * n_image + after)

    bsz = len(prompt_ids)
    width_v = max(len(v) for v in virtual_ids)
    idx = torch.zeros(bsz, width_v - 1, dtype=torch.long, device=device)  # padded positions -> dump row 0
    mask = torch.zeros(bsz, width_v, dtype=torch.long, device=device)
    ids_out = torch.full((bsz, width_v), parts.image_token_id, dtype=torch.long, device=device)
    # Packed merged rows (a zero dump row, then each sample's rows, last prompt token left out) unless
    # the deterministic remerge wants them padded (B, longest + 1): the row-wise layers then run on
    # the real rows, not on B x the longest image's.
    packed = bsz > 1 and not options.deterministic_remerge
    width_u = max(len(r) for r in merged_rows)
    start = 1
    for b in range(bsz):
        n_u, n_v = len(merged_rows[b]) - 1, len(virtual_ids[b])
        start_u = start if packed else width_u - n_u
        idx[b, width_v - n_v :] = start_u + idx_rows[b][:-1]
        mask[b, width_v - n_v :] = 1
        ids_out[b, width_v - n_v :] = torch.tensor(virtual_ids[b], device=device)
        start += n_u
    zero = merged_rows[0].new_zeros(1, merged_rows[0].shape[-1])
    if packed:  # rounded up to a bucket of zero rows no position reads: a few GEMM shapes, not one a batch
        merged = torch.cat([zero, *(r[:-1] for r in merged_rows), zero.expand(bucket_spare(start), -1)])[None]
    else:
        merged = torch.stack(
            [torch.cat([zero.expand(width_u - len(r) + 1, -1), r[:-1]]) for r in merged_rows]
        )
    valid = mask[:, :-1].bool()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, :-1]
    attn_mask = None if bool(valid.all()) else virtual_mask(parts.decoder, valid, dtype)
    graphed = merged.is_cuda and bsz <= options.prefill_graph_batch  # batch 1 is launch-bound
    sink, current = None, None
    if decode_tokens is not None:
        step = _decoder_to_sink_into(parts, bsz, width_v, decode_tokens, dtype, device, options)
        written = width_v - 1 + (bucket_spare(width_v - 1) if graphed else 0)  # the graph's padding too
        if written <= step.length:  # always, unless the context limit capped the buffer
            sink, current = step.sink()
    args = (parts.decoder, merged, idx, rope_theta(parts.decoder.config), positions, attn_mask, options)
    out = graphed_vtu_prefill(*args, borrow=borrow, sink=sink) if graphed else vtu_prefill(*args, sink=sink)
    visual = [int(n) for n in tower.num_tokens]
    kv = PrefillKV(out.keys, out.values, current or out.current)
    return PreparedBatch(kv, ids_out, mask, visual, tower, parts.model)


@torch.no_grad()
def stock_prepare(
    parts: LlavaParts,
    prompt_ids: list[list[int]],
    pixel_values: torch.Tensor,
    on_stage: StageHook | None = None,
    decode_tokens: int | None = None,
    options: Options = DEFAULT,
) -> PreparedBatch:
    """Stock LLaVA's prefill (HF CLIP, all 576 image rows, the decoder's own forward and mask) into
    a cache of the same shape `prepare` fills, so both modes decode through one path. The greedy
    tokens equal the family's own generate (tests check both families).

    `decode_tokens=n` is `prepare`'s: the decoder's own forward writes each layer's keys and values
    into the graph decode's buffer as it goes (`SinkCache`), as transformers' prefill into its
    StaticCache does, so stock holds no second KV cache at its peak either and the two modes'
    memory compares like for like."""
    if len(prompt_ids) != pixel_values.shape[0]:
        raise DymuError(f"{len(prompt_ids)} prompts but {pixel_values.shape[0]} images")
    device = parts.decoder.embed_tokens.weight.device
    dtype = parts.decoder.embed_tokens.weight.dtype
    pixels = pixel_values.to(device, next(parts.vision.parameters()).dtype)
    hidden = parts.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[parts.feature_layer]
    features = parts.projector(hidden[:, 1:].to(dtype))
    if on_stage is not None:
        on_stage("vision")
    rows, virtual_ids = [], []
    for i, ids in enumerate(prompt_ids):
        before, after = split_at_image(ids)
        text = parts.decoder.embed_tokens(torch.tensor(before + after, device=device))
        rows.append(torch.cat([text[: len(before)], features[i], text[len(before) :]]))
        virtual_ids.append(before + [parts.image_token_id] * features.shape[1] + after)
    bsz, width = len(rows), max(len(v) for v in virtual_ids)
    embeds = torch.zeros(bsz, width - 1, rows[0].shape[-1], dtype=dtype, device=device)
    mask = torch.zeros(bsz, width, dtype=torch.long, device=device)
    ids_out = torch.full((bsz, width), parts.image_token_id, dtype=torch.long, device=device)
    for b, (row, vids) in enumerate(zip(rows, virtual_ids, strict=True)):
        embeds[b, width - len(vids) :] = row[:-1]
        mask[b, width - len(vids) :] = 1
        ids_out[b, width - len(vids) :] = torch.tensor(vids, device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, :-1]
    sink, current = None, None
    if decode_tokens is not None:
        step = _decoder_to_sink_into(parts, bsz, width, decode_tokens, dtype, device, options)
        (sink_keys, sink_values), current = step.sink()
        sink = SinkCache(sink_keys, sink_values)
    out = parts.decoder(inputs_embeds=embeds, attention_mask=mask[:, :-1], position_ids=positions, use_cache=True,
                        **({} if sink is None else {cache_keyword(): sink}))  # fmt: skip
    if sink is None:
        keys, values = cache_tensors(out.past_key_values)
    else:
        layers = len(parts.decoder.layers)
        if sink.written != set(range(layers)):
            raise DymuError(f"the decoder's forward handed {len(sink.written)} of {layers} layers' keys and values "
                            "to its cache; this transformers needs kv_sink=False (--no-kv-sink)")  # fmt: skip
        keys = list(sink_keys[:, :, :, : width - 1].unbind(0))
        values = list(sink_values[:, :, :, : width - 1].unbind(0))
    kv = PrefillKV(keys, values, current)
    return PreparedBatch(kv, ids_out, mask, [features.shape[1]] * bsz, None, parts.model)


# One static KV cache per model, reused while batch size, bucketed length, dtype and device stay
# the same: transformers' compiled decode step (CUDA graphs) is recorded for the cache's tensor
# addresses and shapes, so a new cache per call means new recordings (and, with a new length, a
# recompile). The length is rounded up to a multiple of STATIC_CACHE_BUCKET positions.
STATIC_CACHE_BUCKET = 128
_static_caches: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, Any]] = weakref.WeakKeyDictionary()


def _bucketed(parts: LlavaParts, length: int) -> int:
    """`length` rounded up to a multiple of STATIC_CACHE_BUCKET, within the model's context."""
    limit = getattr(parts.decoder.config, "max_position_embeddings", None) or length
    return max(length, min(-(-length // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET, limit))


def _static_cache_for(parts: LlavaParts, keys: list[torch.Tensor], values: list[torch.Tensor], length: int,
                      valid: torch.Tensor) -> Any:  # fmt: skip
    """The model's static cache, reset and filled with the prefill (a new one when the shape changes;
    the old one is dropped first, so only one is ever held)."""
    max_len = _bucketed(parts, length)
    key = (keys[0].shape[0], max_len, keys[0].dtype, str(keys[0].device))
    held = _static_caches.pop(parts.model, None)
    reuse = held[1] if held is not None and held[0] == key else None
    del held
    cache = static_cache(parts.decoder.config, keys, values, max_len, valid, reuse=reuse)
    _static_caches[parts.model] = (key, cache)
    return cache


_static_decoders: weakref.WeakKeyDictionary[torch.nn.Module, StaticDecoder] = weakref.WeakKeyDictionary()
# A held decode buffer this much longer than a call needs still serves it: prompts whose lengths straddle
# a bucket edge then keep one buffer (and its graphs) instead of trading it back and forth; a step
# reads the masked tail too, but at 7B that is 0.5 MB a position against 13.5 GB of weights.
DECODER_SLACK = 2 * STATIC_CACHE_BUCKET


def static_decoder_for(parts: LlavaParts, batch: int, length: int, dtype: torch.dtype, device: torch.device,
                       graphs: bool, fused_rope: bool = True, fused_rows: bool = True) -> StaticDecoder:  # fmt: skip
    """The model's graph-decode state for `length` positions (rounded up like the static cache), kept
    while batch, dtype and device stay the same and its length is that bucket or up to
    `DECODER_SLACK` longer (its captured graphs with it, one per switch set, and the prefill graphs
    that write into its buffer); only one is held per model."""
    max_len = _bucketed(parts, length)
    held = _static_decoders.pop(parts.model, None)
    fits = held is not None and max_len <= held.length <= max_len + DECODER_SLACK
    if not fits or held.key != (batch, held.length, dtype, str(device)):
        del held  # its buffers go before the new ones are allocated
        held = StaticDecoder(parts.decoder, parts.lm_head, batch, max_len, rope_theta(parts.decoder.config), dtype,
                             device, graphs, fused_rope, fused_rows)  # fmt: skip
    held.use(graphs, fused_rope, fused_rows)
    _static_decoders[parts.model] = held
    return held


def _decoder_to_sink_into(parts: LlavaParts, batch: int, prompt: int, decode_tokens: int, dtype: torch.dtype,
                          device: torch.device, options: Options) -> StaticDecoder:  # fmt: skip
    """The decode state the graph decode of `decode_tokens` new tokens after a `prompt`-position
    prompt will use, for a prefill to write into (`prepare` and `stock_prepare`)."""
    check_new_tokens(parts, prompt, decode_tokens)
    return static_decoder_for(parts, batch, prompt + decode_tokens, dtype, device, options.cuda_graphs,
                              options.fused_rope, options.fused_rows)  # fmt: skip


def check_new_tokens(parts: LlavaParts, prompt: int, max_new_tokens: Any) -> None:
    """A one-line DymuError unless `max_new_tokens` is a positive integer that fits the context after
    a prompt of `prompt` positions (text + image)."""
    limit = getattr(parts.decoder.config, "max_position_embeddings", None)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DymuError(f"max_new_tokens={max_new_tokens!r}: must be a positive integer")
    if limit is not None and prompt + max_new_tokens > limit:
        raise DymuError(f"max_new_tokens={max_new_tokens}: the prompt is {prompt} positions (text + image) and the "
                        f"model's context is {limit}; ask for at most {max(0, limit - prompt)} new tokens")  # fmt: skip


def decode_path(
    parts: LlavaParts, options: Options = DEFAULT, kwargs: dict[str, Any] | None = None
) -> tuple[str, str]:
    """("graph" | "static" | "dynamic", why) for this model, device, transformers and generate keywords."""
    unhandled = decode_loop.unhandled(kwargs or {})
    if options.decode == "dynamic":
        return "dynamic", "asked for"
    if options.decode == "graph":
        if unhandled:
            raise DymuError(f"decode='graph' does not implement {', '.join(unhandled)}; use decode='static' or "
                            "'dynamic' (transformers' own decode)")  # fmt: skip
        return "graph", "asked for"
    unsupported = static_cache_supported(parts.model)
    if options.decode == "static" and unsupported:
        raise DymuError(f"decode='static': {unsupported}; use decode='dynamic' or 'graph'")
    if options.decode == "static":
        return "static", "asked for"
    if parts.decoder.embed_tokens.weight.device.type != "cuda":
        return "dynamic", "auto: the fast decode paths pay off on CUDA; this model is on the CPU"
    if not unhandled:
        return "graph", "auto: CUDA (every step one replayed graph over a static KV buffer)"
    if unsupported:
        return (
            "dynamic",
            f"auto: the graph decode does not implement {', '.join(unhandled)}, and {unsupported}",
        )
    return "static", f"auto: the graph decode does not implement {', '.join(unhandled)}"


def sink_tokens(
    parts: LlavaParts, options: Options, kwargs: dict[str, Any], max_new_tokens: int
) -> int | None:
    """What `prepare(decode_tokens=...)` should get for a decode of `max_new_tokens` with these
    generate keywords: the count where the graph decode will run and `options.kv_sink` is on."""
    graph = decode_path(parts, options, kwargs)[0] == "graph"
    return max_new_tokens if graph and options.kv_sink else None


@torch.no_grad()
def generate_prepared(parts: LlavaParts, batch: PreparedBatch, max_new_tokens: int, options: Options = DEFAULT,
                      **kwargs: Any):  # fmt: skip
    """Decode from a prepared batch (greedy unless asked otherwise) on the path `options.decode`
    picks (`decode_path`): dymu's graph decode, or the model's own generate from its dynamic cache
    or a static copy."""
    prompt = batch.virtual_ids.shape[1]
    check_new_tokens(parts, prompt, max_new_tokens)
    path = decode_path(parts, options, kwargs)[0]
    if path == "graph":
        return _graph_decode(parts, batch, max_new_tokens, options, kwargs)
    eos = kwargs.pop("eos_token_id", None)
    if path == "static":
        keys, values = batch.tensors()
        cache = _static_cache_for(parts, keys, values, prompt + max_new_tokens, batch.attention_mask[:, :-1])
    else:
        cache = batch.cache
    gen_kwargs = {
        "input_ids": batch.virtual_ids,
        "attention_mask": batch.attention_mask,
        cache_keyword(): cache,
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "return_dict_in_generate": True,
        "output_scores": True,
        "pad_token_id": kwargs.pop("pad_token_id", 0),
        **kwargs,
    }
    if eos is not None:
        gen_kwargs["eos_token_id"] = eos
    # GenerationMixin.generate directly: the legacy package overrides `generate` to re-embed images
    return GenerationMixin.generate(parts.model, **gen_kwargs)


def id_set(found: Any) -> set[int]:
    """An `eos_token_id`-style value (None, one id, or several) as a set of ids."""
    if found is None:
        return set()
    return {int(i) for i in (found if isinstance(found, (list, tuple, set)) else [found])}


def _graph_decode(parts: LlavaParts, batch: PreparedBatch, max_new_tokens: int, options: Options,
                  kwargs: dict[str, Any]) -> decode_loop.DecodeOutput:  # fmt: skip
    """dymu's own decode: the prefill's keys and values go into the static decode buffer, and each
    new token (the first included) comes from one replayed step (`decode_loop`)."""
    keys, values = batch.tensors()
    prompt = batch.virtual_ids.shape[1]
    config = getattr(parts.model, "generation_config", None)
    step = static_decoder_for(parts, batch.virtual_ids.shape[0], prompt + max_new_tokens, keys[0].dtype,
                              keys[0].device, options.cuda_graphs, options.fused_rope, options.fused_rows)  # fmt: skip
    step.load(keys, values, batch.attention_mask[:, :-1].bool())
    given = kwargs.get("eos_token_id")
    eos = id_set(given if given is not None else getattr(config, "eos_token_id", None))
    return decode_loop.run(
        step,
        batch.virtual_ids,
        max_new_tokens,
        eos,
        int(kwargs.get("pad_token_id") or 0),
        decode_loop.sampling_from(kwargs, config),
        kwargs.get("logits_processor"),
        int(kwargs.get("min_new_tokens") or 0),
        bool(kwargs.get("output_scores", True)),
    )
