"""Next-token choice for a whole batch: penalties, logit_bias, greedy rows at once, sampled
rows per seed, and the logprobs of the distribution each token came from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from serve_app.engine.types import SamplingParams

_NO_INPUT_IDS = cast(torch.LongTensor, torch.empty((1, 0), dtype=torch.long))


class SamplerState:
    """Per-request sampling state: its own RNG (same seed, same text) and output token counts."""

    __slots__ = ("params", "generator", "warpers", "token_counts", "vocab_size", "device")

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device) -> None:
        self.params = params
        self.generator: torch.Generator | None = None
        self.warpers = LogitsProcessorList()
        if not params.is_greedy:
            self.warpers = _build_warpers(params)
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:  # its own nondeterministic seed; torch.seed() would reseed the global RNGs
                self.generator.seed()
        # Allocated on the first token, in the inference thread: requests are created on the
        # event loop, and a parallel torch op there would start a second OpenMP team
        # (serve_app/engine/inference_thread.py says what that costs).
        self.token_counts: torch.Tensor | None = None
        self.vocab_size, self.device = vocab_size, device

    def record(self, token_id: int) -> None:
        if not self.params.has_penalties:
            return
        if self.token_counts is None:
            self.token_counts = torch.zeros(self.vocab_size, device=self.device)
        self.token_counts[token_id] += 1


@dataclass(slots=True)
class RowLogprobs:
    """The chosen token's log-probability and the top alternatives, from the distribution the
    token was drawn from (after penalties, logit_bias and the warpers of its row)."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(slots=True)
class Sampled:
    token_ids: list[int]
    logprobs: list[RowLogprobs | None]  # per row; None where the row did not ask


def sample_next_tokens(logits: torch.Tensor, states: Sequence[SamplerState]) -> list[int]:
    """logits: [batch, vocab] for the last position of each row. Returns one id per row."""
    return sample(logits, states).token_ids


def sample(logits: torch.Tensor, states: Sequence[SamplerState]) -> Sampled:
    """One token per row (logits [batch, vocab], last position), with logprobs where asked."""
    logits = logits.float()
    _apply_penalties(logits, states)
    _apply_logit_bias(logits, states)
    next_ids = torch.argmax(logits, dim=-1)
    scores: dict[int, torch.Tensor] = {}  # the distribution a sampled row was drawn from
    for row, state in enumerate(states):
        if state.generator is not None:
            scores[row] = state.warpers(_NO_INPUT_IDS, logits[row].unsqueeze(0))[0]
            probs = torch.softmax(scores[row], dim=-1)
            next_ids[row] = torch.multinomial(probs, 1, generator=state.generator)[0]
    token_ids = [int(i) for i in next_ids.tolist()]
    logprobs = [
        _row_logprobs(scores.get(row, logits[row]), token_ids[row], state.params.logprobs)
        if state.params.logprobs is not None
        else None
        for row, state in enumerate(states)
    ]
    return Sampled(token_ids, logprobs)


def _row_logprobs(scores: torch.Tensor, token_id: int, num_top: int) -> RowLogprobs:
    logprobs = torch.log_softmax(scores, dim=-1)
    if num_top <= 0:
        return RowLogprobs(logprob=float(logprobs[token_id]), top_ids=[], top_logprobs=[])
    # topk leaves the order of tied values open; argmax (greedy) takes the lowest id. So the
    # values down to the k-th are re-sorted stably in id order: a greedy token is its own
    # top-1 (bf16-rounded logits of native weights tie often). No full sort of the vocabulary.
    cutoff = torch.topk(logprobs, num_top).values[-1]
    candidates = (logprobs >= cutoff).nonzero().squeeze(1)  # ascending ids
    order = torch.sort(logprobs[candidates], descending=True, stable=True).indices[:num_top]
    top_ids = candidates[order]
    return RowLogprobs(
        logprob=float(logprobs[token_id]),
        top_ids=[int(i) for i in top_ids.tolist()],
        top_logprobs=[float(v) for v in logprobs[top_ids].tolist()],
    )


def _apply_penalties(logits: torch.Tensor, states: Sequence[SamplerState]) -> None:
    # OpenAI semantics: subtract frequency * count and presence * (count > 0).
    for row, state in enumerate(states):
        counts = state.token_counts
        if counts is None:
            continue
        params = state.params
        logits[row, : counts.shape[0]] -= (
            counts * params.frequency_penalty + (counts > 0).float() * params.presence_penalty
        )


def _apply_logit_bias(logits: torch.Tensor, states: Sequence[SamplerState]) -> None:
    for row, state in enumerate(states):
        for token_id, bias in state.params.logit_bias:
            if 0 <= token_id < logits.shape[1]:
                logits[row, token_id] += bias


def _build_warpers(params: SamplingParams) -> LogitsProcessorList:
    # transformers' own warpers, so temperature/top-k/top-p match `generate()` exactly.
    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return warpers
