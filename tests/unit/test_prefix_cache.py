"""Prefix caching: the block index on its own, then the engine reusing cached keys/values
(whole prompts, a group mixing cached and uncached rows, a chat's next turn, a chunked rest)
with the same greedy text as transformers' generate() without any cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from serve_app.engine.llm_engine import LLMEngine
from serve_app.engine.prefix_cache import BLOCK_TOKENS, PrefixCache
from serve_app.engine.types import RequestOutput, SamplingParams
from tests.unit.test_engine import LONG_PROMPT, iterate, prompt_ids


def kv(num_tokens: int, value: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    keys = torch.full((1, 2, num_tokens, 4), value)
    return [(keys, -keys), (keys * 2, -keys * 2)]


B = BLOCK_TOKENS


def test_lookup_finds_the_longest_cached_prefix_and_leaves_a_token() -> None:
    cache = PrefixCache(max_tokens=4 * B)
    tokens = list(range(2 * B + B // 2))
    cache.store(tokens, kv(len(tokens), 1.0))
    assert cache.num_tokens == 2 * B + B // 2  # the partial last block too
    hit = cache.lookup(tokens[: B + B // 4] + [999])  # a whole block, then 2 tokens into the next
    assert hit is not None and hit.num_tokens == B + B // 4
    assert hit.layers[1][0].shape == (1, 2, B + B // 4, 4)
    assert float(hit.layers[1][0][0, 0, 0, 0]) == 2.0
    hit = cache.lookup(tokens[: 2 * B + 1])
    assert hit is not None and hit.num_tokens == 2 * B
    hit = cache.lookup(tokens)  # the same prompt again: all but its last token
    assert hit is not None and hit.num_tokens == len(tokens) - 1
    hit = cache.lookup([*tokens, 5, 6])  # a longer one: all the entry holds
    assert hit is not None and hit.num_tokens == len(tokens)
    assert cache.lookup(tokens[:B]) is None  # a hit must leave the last token to compute
    assert cache.lookup([7, *tokens[1:]]) is None  # the first block differs
    cache.store(tokens[: B - 1], kv(B - 1, 5.0))  # under one block: nothing to index it by
    assert cache.num_tokens == 2 * B + B // 2


def test_the_entry_that_goes_furthest_past_the_last_whole_block_is_used() -> None:
    cache = PrefixCache(max_tokens=8 * B)
    shared = list(range(B))
    cache.store([*shared, 1, 2, 3, 4, 5], kv(B + 5, 1.0))
    cache.store([*shared, 1, 2, 9], kv(B + 3, 2.0))  # newer, but shares less of the prompt
    hit = cache.lookup([*shared, 1, 2, 3, 4, 7])
    assert hit is not None and hit.num_tokens == B + 4 and float(hit.layers[0][0].max()) == 1.0
    cache.store([*shared, 1, 2, 3, 4, 5, 6], kv(B + 6, 3.0))  # extends the first: replaces it
    assert cache.num_tokens == (B + 3) + (B + 6)


def test_an_answer_replaces_its_prompt_entry_and_old_entries_are_evicted() -> None:
    cache = PrefixCache(max_tokens=4 * B)
    prompt = list(range(2 * B))
    cache.store(prompt, kv(2 * B, 1.0))
    cache.store([*prompt, *range(100, 100 + 2 * B)], kv(4 * B, 2.0))  # the prompt and its answer
    assert cache.num_tokens == 4 * B  # the prompt's own entry was dropped, not kept twice
    hit = cache.lookup([*prompt, 7])
    assert hit is not None and hit.num_tokens == 2 * B and float(hit.layers[0][0].max()) == 2.0
    cache.store(prompt, kv(2 * B, 9.0))  # inside the longer entry already: nothing added
    assert cache.num_tokens == 4 * B
    cache.store(list(range(500, 500 + 2 * B)), kv(2 * B, 3.0))  # over budget: the oldest goes
    assert cache.num_tokens == 2 * B
    assert cache.lookup([*prompt, 7]) is None
    cache.store(list(range(1000, 1000 + 5 * B)), kv(5 * B, 4.0))  # larger than the budget
    assert cache.num_tokens == 2 * B


def test_evicting_a_newer_entry_keeps_the_blocks_an_older_entry_holds() -> None:
    cache = PrefixCache(max_tokens=6 * B)
    shared = list(range(B))
    older, newer = [*shared, *range(100, 100 + B)], [*shared, *range(200, 200 + B)]
    cache.store(older, kv(2 * B, 1.0))
    cache.store(newer, kv(2 * B, 2.0))  # indexes the shared block too
    assert cache.lookup([*older, 7]) is not None  # the older entry is now the recently used
    cache.store(list(range(300, 300 + 3 * B)), kv(3 * B, 3.0))  # over budget: the newer goes
    hit = cache.lookup([*shared, 999])
    assert hit is not None and hit.num_tokens == B and float(hit.layers[0][0].max()) == 1.0
    partial = cache.lookup([*newer, 7])  # its own last block is gone with it
    assert partial is not None and partial.num_tokens == B


# ---- the engine with a prefix cache -----------------------------------------------------


def prefix_engine(
    tiny_model_dir: Path, engine: LLMEngine, max_prefill_tokens: int = 256
) -> LLMEngine:
    """An engine the test drives itself, with a prefix cache."""
    torch.set_grad_enabled(False)
    return LLMEngine(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        engine.tokenizer,
        max_num_seqs=8,
        max_model_len=512,
        eos_token_ids=set(),
        max_prefill_tokens=max_prefill_tokens,
        prefix_cache_tokens=2048,
    )


def submit_all(
    engine: LLMEngine, requests: dict[str, tuple[list[int], int]]
) -> tuple[dict[str, str], set[str]]:
    """Submits every request (greedy); returns their texts and finished ids as they fill in."""
    texts = dict.fromkeys(requests, "")
    finished: set[str] = set()
    for request_id, (ids, max_tokens) in requests.items():

        def sink(output: RequestOutput, request_id: str = request_id) -> None:
            texts[request_id] += output.text
            if output.is_finished:
                finished.add(request_id)

        engine.submit(request_id, ids, SamplingParams(temperature=0.0, max_tokens=max_tokens), sink)
    return texts, finished


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], int]]) -> dict[str, str]:
    """Submits every request, iterates until all finished, returns their texts."""
    texts, finished = submit_all(engine, requests)
    while len(finished) < len(requests):
        iterate(engine)
    return texts


def greedy_ids(model_dir: Path, ids: list[int], max_new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return [int(t) for t in out[0, len(ids) :]]


def greedy_text(model_dir: Path, engine: LLMEngine, ids: list[int], max_new_tokens: int) -> str:
    new_ids = greedy_ids(model_dir, ids, max_new_tokens)
    return str(engine.tokenizer.decode(new_ids, skip_special_tokens=True))


def full_blocks(num_tokens: int) -> int:
    return num_tokens // BLOCK_TOKENS * BLOCK_TOKENS


def test_a_repeated_prompt_is_prefilled_from_the_cache_with_the_same_answer(
    tiny_model_dir: Path, engine: LLMEngine
) -> None:
    cached = prefix_engine(tiny_model_dir, engine)
    ids = prompt_ids(engine, LONG_PROMPT)
    first = run(cached, {"a": (ids, 12)})["a"]
    assert cached.stats().num_cached_prompt_tokens == 0
    second = run(cached, {"b": (ids, 12)})["b"]
    assert cached.stats().num_cached_prompt_tokens == len(ids) - 1  # only its last token fed
    assert first == second == greedy_text(tiny_model_dir, engine, ids, 12)


def test_outputs_carry_the_prompt_tokens_taken_from_the_cache(
    tiny_model_dir: Path, engine: LLMEngine
) -> None:
    """What usage.prompt_tokens_details.cached_tokens reports (response_builder.py)."""
    cached = prefix_engine(tiny_model_dir, engine)
    ids = prompt_ids(engine, LONG_PROMPT)
    outputs: dict[str, list[RequestOutput]] = {"a": [], "b": []}
    for request_id in ("a", "b"):
        sink = outputs[request_id].append
        cached.submit(request_id, ids, SamplingParams(temperature=0.0, max_tokens=4), sink)
        while not (outputs[request_id] and outputs[request_id][-1].is_finished):
            iterate(cached)
    assert {o.num_cached_prompt_tokens for o in outputs["a"]} == {0}
    assert {o.num_cached_prompt_tokens for o in outputs["b"]} == {len(ids) - 1}


def test_one_prefill_mixing_cached_and_uncached_rows_matches_generate(
    tiny_model_dir: Path, engine: LLMEngine
) -> None:
    cached = prefix_engine(tiny_model_dir, engine)
    long_ids = prompt_ids(engine, LONG_PROMPT)
    run(cached, {"seed": (long_ids, 3)})
    prompts = {
        "extends": long_ids + prompt_ids(engine, " Paris is a city in France."),
        "fresh": prompt_ids(engine, "def main():"),
        "shares-40-tokens": long_ids[:40] + prompt_ids(engine, "héllo"),
    }
    texts, _ = submit_all(cached, {request_id: (ids, 10) for request_id, ids in prompts.items()})
    cached.step()
    # One forward for all three: each row's cached prefix, padding, then the rest of its prompt.
    hits = {seq.request_id: seq.num_cached for seq in cached.scheduler.running}
    shared = full_blocks(40)
    assert hits == {"extends": len(long_ids), "fresh": 0, "shares-40-tokens": shared}
    while cached.scheduler.running:
        cached.step()
    for request_id, ids in prompts.items():
        assert texts[request_id] == greedy_text(tiny_model_dir, engine, ids, 10), request_id


def test_the_next_turn_of_a_chat_reuses_the_cached_answer(
    tiny_model_dir: Path, engine: LLMEngine
) -> None:
    cached = prefix_engine(tiny_model_dir, engine)
    question = prompt_ids(engine, LONG_PROMPT)
    run(cached, {"turn-1": (question, 20)})
    answer = greedy_ids(tiny_model_dir, question, 20)  # what the engine answered (same greedy)
    next_turn = question + answer + prompt_ids(engine, " The capital of France is")
    before = cached.stats().num_cached_prompt_tokens
    text = run(cached, {"turn-2": (next_turn, 8)})["turn-2"]
    reused = cached.stats().num_cached_prompt_tokens - before
    # The cache holds the question and all but the last answer token (never fed back).
    assert reused == len(question) + len(answer) - 1 > len(question)
    assert text == greedy_text(tiny_model_dir, engine, next_turn, 8)


@pytest.mark.parametrize("budget", [16, 100])  # 100: chunks longer than the cache's spare room
def test_a_long_rest_after_a_cached_prefix_is_prefilled_in_chunks(
    tiny_model_dir: Path, engine: LLMEngine, budget: int
) -> None:
    cached = prefix_engine(tiny_model_dir, engine, max_prefill_tokens=budget)
    ids = prompt_ids(engine, " ".join([LONG_PROMPT] * 4))
    assert len(ids) - 40 > 2 * budget  # so the rest takes several chunks
    run(cached, {"seed": (ids[:40], 2)})
    text = run(cached, {"long": (ids, 6)})["long"]
    assert cached.stats().num_cached_prompt_tokens == full_blocks(40)
    assert text == greedy_text(tiny_model_dir, engine, ids, 6)


@pytest.mark.parametrize("sliding_window", [None, 64])
def test_prefix_caching_is_off_for_sliding_window_models(
    tiny_model_dir: Path, engine: LLMEngine, sliding_window: int | None
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.sliding_window = sliding_window
    built = LLMEngine(
        model,
        engine.tokenizer,
        max_num_seqs=2,
        max_model_len=512,
        eos_token_ids=set(),
        prefix_cache_tokens=1024,
    )
    assert (built.runner.prefix_cache is None) == (sliding_window is not None)
