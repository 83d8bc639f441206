"""Batch sampling: greedy, seeded sampling, top-k, penalties."""

from __future__ import annotations

import torch

from serve_app.engine.sampling import SamplerState, sample_next_tokens
from serve_app.engine.types import SamplingParams

DEVICE = torch.device("cpu")


def state(**params: object) -> SamplerState:
    return SamplerState(SamplingParams(**params), vocab_size=8, device=DEVICE)  # type: ignore[arg-type]


def test_greedy_rows_take_argmax() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 0, 0, 0, 0, 0], [3.0, 0, 0, 0, 0, 0, 0, 9.0]])
    assert sample_next_tokens(logits, [state(temperature=0.0), state(temperature=0.0)]) == [1, 7]


def test_top_k_one_is_greedy_even_at_high_temperature() -> None:
    logits = torch.randn(4, 8)
    states = [state(temperature=2.0, top_k=1, seed=i) for i in range(4)]
    assert sample_next_tokens(logits, states) == logits.argmax(dim=-1).tolist()


def test_seeded_sampling_is_reproducible_and_rows_are_independent() -> None:
    logits = torch.zeros(1, 8)
    a = state(seed=7)
    b = state(seed=7)
    draws_a = [sample_next_tokens(logits, [a])[0] for _ in range(20)]
    draws_b = [sample_next_tokens(logits, [b])[0] for _ in range(20)]
    assert draws_a == draws_b
    assert len(set(draws_a)) > 1  # uniform logits: sampling, not argmax


def test_frequency_and_presence_penalties_lower_seen_tokens() -> None:
    logits = torch.tensor([[4.0, 3.5, 0, 0, 0, 0, 0, 0]])
    plain = state(temperature=0.0)
    penalised = state(temperature=0.0, frequency_penalty=1.0, presence_penalty=0.0)
    penalised.record(0)
    assert sample_next_tokens(logits.clone(), [plain]) == [0]
    assert sample_next_tokens(logits.clone(), [penalised]) == [1]


def test_an_unseeded_request_leaves_torch_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    unseeded = state(temperature=1.0)  # draws a seed of its own
    assert torch.equal(torch.rand(4), expected)
    assert unseeded.generator is not None and unseeded.generator.initial_seed() != 1234


def test_logit_bias_bans_and_forces_tokens() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 0, 0, 0, 0, 0]])
    assert sample_next_tokens(
        logits.clone(), [state(temperature=0.0, logit_bias=((1, -100),))]
    ) == [2]
    assert sample_next_tokens(logits.clone(), [state(temperature=0.0, logit_bias=((6, 100),))]) == [
        6
    ]


def test_logprobs_come_from_the_distribution_the_token_was_drawn_from() -> None:
    from serve_app.engine.sampling import sample

    logits = torch.tensor([[0.0, 5.0, 1.0, 0, 0, 0, 0, 0], [1.0, 2.0, 3.0, 4.0, 0, 0, 0, 0]])
    rows = [state(temperature=0.0, logprobs=3), state(temperature=0.0)]
    sampled = sample(logits.clone(), rows)
    first, second = sampled.logprobs
    assert second is None and first is not None
    assert sampled.token_ids[0] == first.top_ids[0] == 1
    expected = torch.log_softmax(logits[0], dim=-1)
    assert abs(first.logprob - float(expected[1])) < 1e-6
    assert first.top_logprobs == sorted(first.top_logprobs, reverse=True)
    assert all(v <= 0 for v in first.top_logprobs) and len(first.top_ids) == 3
    # A sampled row's logprobs are those of its warped scores (temperature 0.5 sharpens).
    warm = sample(logits[:1].clone(), [state(temperature=0.5, seed=1, logprobs=0)])
    [warm_logprobs] = warm.logprobs
    sharpened = torch.log_softmax(logits[0] / 0.5, dim=-1)
    assert warm_logprobs is not None and warm_logprobs.top_ids == []
    assert abs(warm_logprobs.logprob - float(sharpened[warm.token_ids[0]])) < 1e-5


def test_a_greedy_token_tied_with_others_is_its_own_top_logprob() -> None:
    from serve_app.engine.sampling import sample

    # bf16-rounded logits (native weights) tie often; argmax takes the lowest tied id
    vocab = 4096
    logits = torch.zeros((1, vocab))
    tied = [5, 700, 1200, 3000, 4000]
    logits[0, tied] = 7.5
    row = SamplerState(SamplingParams(temperature=0.0, logprobs=3), vocab_size=vocab, device=DEVICE)
    sampled = sample(logits, [row])
    [entry] = sampled.logprobs
    assert entry is not None and sampled.token_ids == [5]
    assert entry.top_ids == [5, 700, 1200]
