"""dymu's own decode loop (`Options.decode="graph"`): every new token, the first included, from one
replayed step over a static KV buffer (`static_decode.StaticDecoder`), with generate's stopping
and scoring rules.

It keeps what callers of `generate` rely on: greedy by default; `do_sample` with temperature,
top-k and top-p (unset ones from the model's generation config, as generate does); logits
processors called with the ids so far; `min_new_tokens` (EOS suppressed until then); rows that
finish are padded with `pad_token_id` and decoding stops once every row has finished; the output
has `sequences` (prompt + new ids) and, when asked, the per-step `scores`. Anything else a caller
passes (beam search, repetition penalty, streamers, ...) is not handled here: `unhandled` names
it, and `generation.decode_path` then picks transformers' own decode instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .static_decode import StaticDecoder

HANDLED = frozenset({"do_sample", "temperature", "top_k", "top_p", "logits_processor", "min_new_tokens",
                     "pad_token_id", "eos_token_id", "output_scores", "return_dict_in_generate"})  # fmt: skip


@dataclass
class DecodeOutput:
    """What `generate(..., return_dict_in_generate=True)` returns, as far as dymu's callers read it."""

    sequences: torch.Tensor  # (B, prompt + new)
    scores: tuple[torch.Tensor, ...] | None  # (B, vocab) per step, after processing; None unless asked


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked from processed scores (greedy unless `do_sample`)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def unhandled(kwargs: dict[str, Any]) -> list[str]:
    """The generate keywords this loop does not implement (sorted), e.g. `num_beams`."""
    return sorted(k for k in kwargs if k not in HANDLED)


def sampling_from(kwargs: dict[str, Any], defaults: Any) -> Sampling:
    """The sampling settings of one call: the caller's, else the generation config's (`defaults`)."""
    do_sample = bool(kwargs.get("do_sample", getattr(defaults, "do_sample", False)))
    if not do_sample:
        return Sampling()

    def pick(name: str, fallback: Any) -> Any:
        value = kwargs.get(name)
        value = getattr(defaults, name, None) if value is None else value
        return fallback if value is None else value

    return Sampling(True, float(pick("temperature", 1.0)), int(pick("top_k", 0)), float(pick("top_p", 1.0)))


def warp(scores: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on (B, vocab) scores; the most likely token
    always survives."""
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = before >= sampling.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, -math.inf)
    return scores


def next_tokens(scores: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    if not sampling.do_sample:
        return scores.argmax(-1)
    return torch.multinomial(warp(scores, sampling).softmax(-1), 1).squeeze(-1)


@torch.no_grad()
def run(
    step: StaticDecoder,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    eos: set[int],
    pad_token_id: int,
    sampling: Sampling = Sampling(),
    logits_processor: Any = None,
    min_new_tokens: int = 0,
    output_scores: bool = False,
) -> DecodeOutput:
    """Decode from a loaded `step` whose next input is the last column of `prompt_ids` (B, P)."""
    device = step.ids.device
    sequences = prompt_ids.to(device)
    eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=device) if eos else None
    unfinished = torch.ones(sequences.shape[0], dtype=torch.bool, device=device)
    scores_out: list[torch.Tensor] = []
    current = sequences[:, -1]
    for produced in range(max_new_tokens):
        scores = step.step(current).clone()
        if eos_ids is not None and produced < min_new_tokens:
            scores[:, eos_ids] = -math.inf
        if logits_processor is not None:
            scores = logits_processor(sequences, scores)
        if output_scores:
            scores_out.append(scores)
        chosen = next_tokens(scores, sampling)
        chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad_token_id))
        sequences = torch.cat([sequences, chosen[:, None]], dim=1)
        current = chosen
        if eos_ids is not None:
            unfinished &= ~torch.isin(chosen, eos_ids)
            if not bool(unfinished.any()):
                break
    return DecodeOutput(sequences, tuple(scores_out) if output_scores else None)
