"""Next-token choice for a whole batch: penalties, greedy rows at once, sampled rows per seed."""

from __future__ import annotations

from collections.abc import Sequence
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
        # (serve_app/loading.py, in_own_thread, says what that costs).
        self.token_counts: torch.Tensor | None = None
        self.vocab_size, self.device = vocab_size, device

    def record(self, token_id: int) -> None:
        if not self.params.has_penalties:
            return
        if self.token_counts is None:
            self.token_counts = torch.zeros(self.vocab_size, device=self.device)
        self.token_counts[token_id] += 1


def sample_next_tokens(logits: torch.Tensor, states: Sequence[SamplerState]) -> list[int]:
    """logits: [batch, vocab] for the last position of each row. Returns one id per row."""
    logits = logits.float()
    _apply_penalties(logits, states)
    next_ids = torch.argmax(logits, dim=-1)
    for row, state in enumerate(states):
        if state.generator is not None:
            next_ids[row] = _sample_row(logits[row], state)
    return [int(i) for i in next_ids.tolist()]


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


def _sample_row(row_logits: torch.Tensor, state: SamplerState) -> torch.Tensor:
    scores = state.warpers(_NO_INPUT_IDS, row_logits.unsqueeze(0))  # warpers ignore input_ids
    probs = torch.softmax(scores, dim=-1)[0]
    return torch.multinomial(probs, 1, generator=state.generator)[0]


def _build_warpers(params: SamplingParams) -> LogitsProcessorList:
    # transformers' own warpers, so temperature/top-k/top-p match `generate()` exactly.
    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    return warpers
