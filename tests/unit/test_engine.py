"""Continuous-batching engine on a tiny random Llama loaded through the real loading path."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from serve_app.engine.llm_engine import LLMEngine
from serve_app.engine.types import RequestOutput, SamplingParams

PROMPTS = ["The capital of France is", "def main():", "héllo wörld 世界"]


def prompt_ids(engine: LLMEngine, text: str) -> list[int]:
    return list(engine.tokenizer(text)["input_ids"])


async def collect(
    engine: LLMEngine, request_id: str, text: str, **params: object
) -> list[RequestOutput]:
    outputs = []
    async for output in engine.generate(
        request_id, prompt_ids(engine, text), SamplingParams(**params)
    ):  # type: ignore[arg-type]
        outputs.append(output)
    return outputs


def joined(outputs: list[RequestOutput]) -> str:
    return "".join(o.text for o in outputs)


def hf_greedy(model_dir: Path, engine: LLMEngine, text: str, max_new_tokens: int) -> str:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([prompt_ids(engine, text)])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return str(engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


async def test_batched_greedy_matches_transformers_generate(
    engine: LLMEngine, tiny_model_dir: Path
) -> None:
    results = await asyncio.gather(
        *(
            collect(engine, f"r{i}", p, temperature=0.0, max_tokens=24)
            for i, p in enumerate(PROMPTS)
        )
    )
    for prompt, outputs in zip(PROMPTS, results, strict=True):
        assert joined(outputs) == hf_greedy(tiny_model_dir, engine, prompt, 24)
        assert outputs[-1].finish_reason in ("length", "stop")


async def test_length_finish_and_token_counts(engine: LLMEngine) -> None:
    outputs = await collect(engine, "r", "The capital", temperature=0.0, max_tokens=7)
    last = outputs[-1]
    assert last.finish_reason in ("length", "stop")
    if last.finish_reason == "length":
        assert last.num_generated_tokens == 7
    assert last.num_prompt_tokens == len(prompt_ids(engine, "The capital"))
    assert all(o.finish_reason is None for o in outputs[:-1])


async def test_same_seed_gives_same_text(engine: LLMEngine) -> None:
    a, b, c = await asyncio.gather(
        collect(engine, "a", "def main():", temperature=1.0, seed=1234, max_tokens=30),
        collect(engine, "b", "def main():", temperature=1.0, seed=1234, max_tokens=30),
        collect(engine, "c", "def main():", temperature=1.0, seed=99, max_tokens=30),
    )
    assert joined(a) == joined(b)
    assert joined(a) != joined(c)


async def test_stop_string_spanning_tokens_is_honoured(engine: LLMEngine) -> None:
    full = joined(await collect(engine, "a", "héllo", temperature=0.0, max_tokens=40))
    stop = full[10:14]
    assert len(stop) == 4, "the greedy text is long enough to pick a stop string from"
    outputs = await collect(engine, "b", "héllo", temperature=0.0, max_tokens=40, stop=(stop,))
    assert joined(outputs) == full[: full.find(stop)]
    assert outputs[-1].finish_reason == "stop"


async def test_abort_frees_the_slot_before_the_next_step(engine: LLMEngine) -> None:
    stream = engine.generate(
        "long", prompt_ids(engine, "The"), SamplingParams(temperature=0.0, max_tokens=400)
    )
    for _ in range(3):
        await stream.__anext__()
    await stream.aclose()  # what a client disconnect does to the replica's generator
    for _ in range(100):
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_aborted == 1:
            break
        await asyncio.sleep(0.02)
    assert stats.num_running == 0 and stats.num_aborted == 1
    assert engine.runner.batch.num_rows == 0 and engine.runner.batch.cache is None


async def test_explicit_abort_of_waiting_and_running_requests(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from serve_app.loading import build_llm_engine
    from tests.unit.conftest import tiny_model_config

    engine = build_llm_engine(tiny_model_config(tiny_model_dir, max_num_seqs=1), tmp_path)
    try:
        running = asyncio.create_task(
            collect(engine, "running", "The", temperature=0.0, max_tokens=300)
        )
        waiting = asyncio.create_task(
            collect(engine, "waiting", "The", temperature=0.0, max_tokens=300)
        )
        await asyncio.sleep(0.2)
        assert engine.stats().num_waiting == 1
        engine.abort("waiting")
        engine.abort("running")
        results = await asyncio.wait_for(asyncio.gather(running, waiting), timeout=10)
        assert [r[-1].finish_reason for r in results] == ["abort", "abort"]
        assert engine.stats().num_running == 0 and engine.stats().num_waiting == 0
    finally:
        engine.shutdown()


async def test_request_arriving_mid_batch_starts_before_the_batch_finishes(
    engine: LLMEngine,
) -> None:
    long_outputs: list[RequestOutput] = []

    async def long_request() -> None:
        params = SamplingParams(temperature=0.0, max_tokens=300)
        async for output in engine.generate("long", prompt_ids(engine, "The"), params):
            long_outputs.append(output)

    task = asyncio.create_task(long_request())
    while sum(1 for _ in long_outputs) < 5:
        await asyncio.sleep(0.005)
    late = engine.generate(
        "late", prompt_ids(engine, "def"), SamplingParams(temperature=0.0, max_tokens=5)
    )
    first_late = await late.__anext__()
    tokens_of_long_so_far = long_outputs[-1].num_generated_tokens
    assert first_late.num_generated_tokens >= 1
    assert not long_outputs[-1].is_finished and tokens_of_long_so_far < 300
    await late.aclose()
    await task


async def test_max_num_seqs_queues_extra_requests(tiny_model_dir: Path, tmp_path: Path) -> None:
    from serve_app.loading import build_llm_engine
    from tests.unit.conftest import tiny_model_config

    engine = build_llm_engine(tiny_model_config(tiny_model_dir, max_num_seqs=2), tmp_path)
    try:
        results = await asyncio.gather(
            *(
                collect(engine, f"r{i}", p, temperature=0.0, max_tokens=10)
                for i, p in enumerate(PROMPTS * 2)
            )
        )
        assert all(r[-1].is_finished for r in results)
        assert joined(results[0]) == joined(results[3])  # same prompt, same greedy text
    finally:
        engine.shutdown()


@pytest.mark.parametrize("max_tokens", [1, 2])
async def test_tiny_max_tokens(engine: LLMEngine, max_tokens: int) -> None:
    outputs = await collect(engine, "r", "The", temperature=0.0, max_tokens=max_tokens)
    assert outputs[-1].num_generated_tokens <= max_tokens


def test_requests_prefilled_together_match_transformers_generate(
    tiny_model_dir: Path, engine: LLMEngine
) -> None:
    """Several arrivals of different lengths in one left-padded prefill, then decoded as a batch."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch_engine = LLMEngine(
        model, engine.tokenizer, max_num_seqs=8, max_model_len=512, eos_token_ids=set()
    )  # not started: this test drives the steps itself
    texts: dict[str, str] = {p: "" for p in PROMPTS}
    for prompt in PROMPTS:

        def sink(output: RequestOutput, prompt: str = prompt) -> None:
            texts[prompt] += output.text

        batch_engine.submit(
            prompt, prompt_ids(engine, prompt), SamplingParams(temperature=0.0, max_tokens=16), sink
        )
    torch.set_grad_enabled(False)
    batch_engine.step()  # an iteration prefills one group (or one chunk), then decodes
    assert [seq.request_id for seq in batch_engine.scheduler.running] == PROMPTS
    assert len({len(prompt_ids(engine, p)) for p in PROMPTS}) > 1  # so rows were left-padded
    while batch_engine.scheduler.running:
        batch_engine.step()
    for prompt in PROMPTS:
        assert texts[prompt] == hf_greedy(tiny_model_dir, engine, prompt, 16)


async def test_freed_memory_is_given_back_once_the_batch_drains(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serve_app.engine import llm_engine

    calls: list[int] = []
    monkeypatch.setattr(llm_engine, "release_free_memory", lambda: calls.append(engine.is_busy))
    await asyncio.gather(*(collect(engine, f"m{i}", "Hi", max_tokens=5) for i in range(3)))
    await asyncio.sleep(0.2)  # the inference thread trims after sending the finals
    assert calls and not any(calls)  # trimmed, and only with nothing running or waiting


LONG_PROMPT = " ".join(["The capital of France is Paris."] * 8)


def manual_engine(tiny_model_dir: Path, engine: LLMEngine, max_prefill_tokens: int) -> LLMEngine:
    """An engine that is never started: the test drives its iterations itself."""
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return LLMEngine(
        model,
        engine.tokenizer,
        max_num_seqs=4,
        max_model_len=512,
        eos_token_ids=set(),
        max_prefill_tokens=max_prefill_tokens,
    )


def iterate(engine: LLMEngine) -> None:
    """One pass of the inference loop: commands, this iteration's prefill, one decode step."""
    engine.step()


def test_long_prompt_prefilled_in_chunks_matches_transformers_generate(
    tiny_model_dir: Path, engine: LLMEngine
) -> None:
    chunked = manual_engine(tiny_model_dir, engine, max_prefill_tokens=16)
    ids = prompt_ids(engine, LONG_PROMPT)
    assert len(ids) > 3 * 16  # so it takes at least 4 chunks
    outputs: list[RequestOutput] = []
    chunked.submit("long", ids, SamplingParams(temperature=0.0, max_tokens=12), outputs.append)
    num_iterations = 0
    while not outputs or not outputs[-1].is_finished:
        iterate(chunked)
        num_iterations += 1
    # One iteration per chunk; the last chunk's iteration gives token 1 and its decode step
    # token 2, then one token per iteration.
    assert num_iterations == -(-len(ids) // 16) + 12 - 2
    assert joined(outputs) == hf_greedy(tiny_model_dir, engine, LONG_PROMPT, 12)


def test_running_streams_keep_decoding_while_a_long_prompt_prefills(
    tiny_model_dir: Path, engine: LLMEngine
) -> None:
    chunked = manual_engine(tiny_model_dir, engine, max_prefill_tokens=16)
    params = SamplingParams(temperature=0.0, max_tokens=40)
    chunked.submit("short", prompt_ids(engine, "The"), params, lambda _: None)
    iterate(chunked)
    long_ids = prompt_ids(engine, LONG_PROMPT)
    chunked.submit("long", long_ids, SamplingParams(temperature=0.0, max_tokens=4), lambda _: None)
    short_seq = chunked.scheduler.running[0]
    tokens_before = short_seq.num_generated
    iterate(chunked)
    long_seq = chunked.scheduler.chunked
    assert long_seq is not None and long_seq.num_computed == 16
    assert chunked.stats().running_ids == ["short", "long"]  # the long one holds its slot
    num_chunks = 1
    while chunked.scheduler.chunked is not None:
        iterate(chunked)
        num_chunks += 1
    assert num_chunks == -(-len(long_ids) // 16)
    # The short stream got one token per iteration while the long prompt was prefilled.
    assert short_seq.num_generated == tokens_before + num_chunks
    assert [seq.request_id for seq in chunked.scheduler.running] == ["short", "long"]


def test_first_tokens_go_out_before_the_running_rows_decode(
    tiny_model_dir: Path, engine: LLMEngine
) -> None:
    """on_step (the engine process's send) runs between a prefill and the decode step, so a
    request joining a busy batch does not wait a whole decode step for its first token."""
    manual = manual_engine(tiny_model_dir, engine, max_prefill_tokens=64)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    sent: list[dict[str, int]] = []  # per on_step call: tokens made so far, per running row

    def send() -> None:
        sent.append({seq.request_id: seq.num_generated for seq in manual.scheduler.running})

    manual.on_step = send
    manual.submit("running", prompt_ids(engine, "The"), params, lambda _: None)
    manual.step()  # its prefill (token 1), a send, then its first decode step (token 2)
    assert sent == [{"running": 1}]
    manual.submit("joining", prompt_ids(engine, "def main():"), params, lambda _: None)
    manual.step()
    # Sent once the joining request had its first token, before the running row's third.
    assert sent[1:] == [{"running": 2, "joining": 1}]
    manual.step()  # no prefill: nothing sent mid-step (the loop sends after each step)
    assert len(sent) == 2
    assert {seq.request_id: seq.num_generated for seq in manual.scheduler.running} == {
        "running": 4,
        "joining": 3,
    }


def test_abort_during_chunked_prefill_frees_its_slot(
    tiny_model_dir: Path, engine: LLMEngine
) -> None:
    chunked = manual_engine(tiny_model_dir, engine, max_prefill_tokens=16)
    outputs: list[RequestOutput] = []
    ids = prompt_ids(engine, LONG_PROMPT)
    chunked.submit("long", ids, SamplingParams(temperature=0.0, max_tokens=4), outputs.append)
    iterate(chunked)
    assert chunked.scheduler.chunked is not None
    chunked.abort("long")
    iterate(chunked)
    assert [o.finish_reason for o in outputs] == ["abort"]
    assert chunked.scheduler.chunked is None and not chunked.is_busy
    assert chunked.stats().num_running == 0 and chunked.stats().num_aborted == 1


def run_to_end(engine: LLMEngine, text_ids: list[int], params: SamplingParams) -> RequestOutput:
    outputs: list[RequestOutput] = []
    engine.submit("r", text_ids, params, outputs.append)
    while not outputs or not outputs[-1].is_finished:
        iterate(engine)
    return outputs[-1]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_eos_ends_a_stream_unless_ignore_eos(
    tiny_model_dir: Path, engine: LLMEngine, ignore_eos: bool
) -> None:
    manual = manual_engine(tiny_model_dir, engine, max_prefill_tokens=256)
    ids = prompt_ids(engine, "The capital of France is")
    first_token = int(manual.runner.model(torch.tensor([ids])).logits[0, -1].argmax())
    manual.processor.eos_token_ids = {first_token}  # so greedy decoding meets EOS at once
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=ignore_eos)
    last = run_to_end(manual, ids, params)
    expected = ("length", 6) if ignore_eos else ("stop", 1)
    assert (last.finish_reason, last.num_generated_tokens) == expected


async def test_weights_load_on_the_thread_that_runs_the_steps(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One thread does all torch work, so the process has one OpenMP team
    (serve_app/engine/inference_thread.py): the loading thread is the decoding thread, and
    neither is the caller's."""
    import threading

    from serve_app import loading
    from serve_app.engine.model_runner import ModelRunner
    from tests.unit.conftest import tiny_model_config

    loading_threads: list[threading.Thread] = []
    decoding_threads: set[threading.Thread] = set()
    real_load_model, real_decode = loading.load_model, ModelRunner.decode

    def spy_load(*args: object) -> object:
        loading_threads.append(threading.current_thread())
        return real_load_model(*args)  # type: ignore[arg-type]

    def spy_decode(self: ModelRunner, rows: Any) -> Any:
        decoding_threads.add(threading.current_thread())
        return real_decode(self, rows)

    monkeypatch.setattr(loading, "load_model", spy_load)
    monkeypatch.setattr(ModelRunner, "decode", spy_decode)
    built = loading.build_llm_engine(tiny_model_config(tiny_model_dir), tmp_path)
    try:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        async for _ in built.generate("same-thread", [1, 2, 3], params):
            pass
        [thread] = loading_threads
        assert thread is not threading.current_thread()
        assert decoding_threads == {thread}
    finally:
        built.shutdown()
    assert not built.is_alive and not thread.is_alive()


async def test_stream_interval_sends_fewer_chunks_with_the_same_text(
    tiny_model_dir: Path, engine: LLMEngine, tmp_path: Path
) -> None:
    from serve_app.loading import build_llm_engine
    from tests.unit.conftest import tiny_model_config

    every_token = await collect(engine, "a", PROMPTS[0], temperature=0.0, max_tokens=21)
    grouped = build_llm_engine(tiny_model_config(tiny_model_dir, stream_interval=4), tmp_path)
    try:
        by_four = await collect(grouped, "b", PROMPTS[0], temperature=0.0, max_tokens=21)
    finally:
        grouped.shutdown()
    assert joined(by_four) == joined(every_token)
    assert by_four[-1].num_generated_tokens == every_token[-1].num_generated_tokens == 21
    counts = [o.num_generated_tokens for o in by_four[:-1]]
    assert counts[0] == every_token[0].num_generated_tokens  # the first text is not held
    assert all(b - a >= 4 for a, b in zip(counts, counts[1:], strict=False))
    assert len(by_four) < len(every_token)


async def test_int8_quantized_model_is_not_packed_and_generates(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from serve_app.engine.packed_linear import PackedLinear
    from serve_app.loading import build_llm_engine
    from tests.unit.conftest import tiny_model_config

    quantized = build_llm_engine(tiny_model_config(tiny_model_dir, quantization="int8"), tmp_path)
    try:
        modules = list(quantized.runner.model.modules())
        assert not any(isinstance(m, PackedLinear) for m in modules)
        assert any("quantized" in type(m).__module__ for m in modules)
        outputs = await collect(quantized, "q", PROMPTS[0], temperature=0.0, max_tokens=5)
        assert outputs[-1].finish_reason in ("length", "stop")
    finally:
        quantized.shutdown()


async def test_a_hung_group_prefill_from_an_idle_engine_reads_as_stuck(engine: LLMEngine) -> None:
    """The request is out of the queue and not yet a batch row: it still counts as busy."""
    import threading

    entered, release = threading.Event(), threading.Event()
    real_prefill = engine.runner.prefill

    def hanging_prefill(group: list[Any]) -> list[int]:
        entered.set()
        release.wait(timeout=30)
        return real_prefill(group)

    engine.runner.prefill = hanging_prefill  # type: ignore[method-assign]
    task = asyncio.create_task(collect(engine, "hung", "The", temperature=0.0, max_tokens=3))
    try:
        assert await asyncio.to_thread(entered.wait, 10)
        await asyncio.sleep(0.2)
        assert engine.is_busy and engine.is_stuck(max_step_seconds=0.1)
    finally:
        release.set()
    outputs = await asyncio.wait_for(task, timeout=30)
    assert outputs[-1].finish_reason in ("stop", "length") and not engine.is_stuck(0.1)


def test_identical_prompts_in_one_group_are_computed_once(
    tiny_model_dir: Path, engine: LLMEngine
) -> None:
    """n > 1 choices of one request: one prefill row, copied; each copy decodes on its own."""
    manual = manual_engine(tiny_model_dir, engine, max_prefill_tokens=256)
    prefill_rows: list[int] = []
    real_forward = manual.runner.model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        if kwargs["input_ids"].shape[1] > 1:  # a prefill, not a decode step
            prefill_rows.append(int(kwargs["input_ids"].shape[0]))
        return real_forward(*args, **kwargs)

    manual.runner.model.forward = spy  # type: ignore[method-assign]
    ids = prompt_ids(engine, PROMPTS[0])
    texts = {"a": "", "b": "", "other": ""}
    for request_id in texts:
        prompt = prompt_ids(engine, PROMPTS[1]) if request_id == "other" else ids

        def sink(output: RequestOutput, request_id: str = request_id) -> None:
            texts[request_id] += output.text

        manual.submit(request_id, prompt, SamplingParams(temperature=0.0, max_tokens=10), sink)
    manual.step()
    while manual.scheduler.running:
        manual.step()
    assert prefill_rows == [2]  # two distinct prompts for three requests
    assert texts["a"] == texts["b"] == hf_greedy(tiny_model_dir, engine, PROMPTS[0], 10)
    assert texts["other"] == hf_greedy(tiny_model_dir, engine, PROMPTS[1], 10)


async def test_logprobs_arrive_with_the_text_one_per_token(engine: LLMEngine) -> None:
    outputs = await collect(engine, "lp", PROMPTS[0], temperature=0.0, max_tokens=8, logprobs=2)
    entries = [entry for o in outputs for entry in (o.logprobs or [])]
    assert len(entries) == outputs[-1].num_generated_tokens
    assert all(e.logprob <= 0 and len(e.top) == 2 for e in entries)
    assert all(e.token_id == e.top[0][0] for e in entries)  # greedy: the most likely token
    assert "".join(e.token for e in entries).startswith(joined(outputs)[:3])
    plain = await collect(engine, "plain", PROMPTS[0], temperature=0.0, max_tokens=8)
    assert all(o.logprobs is None for o in plain) and joined(plain) == joined(outputs)


async def test_a_consumer_that_falls_behind_gets_the_ready_text_merged(engine: LLMEngine) -> None:
    every = await collect(engine, "every", PROMPTS[0], temperature=0.0, max_tokens=24)
    merged: list[RequestOutput] = []
    params = SamplingParams(temperature=0.0, max_tokens=24)
    async for output in engine.generate("slow", prompt_ids(engine, PROMPTS[0]), params):
        merged.append(output)
        await asyncio.to_thread(time.sleep, 0.05)  # the engine runs ahead meanwhile
    assert joined(merged) == joined(every) and len(merged) < len(every)
    assert merged[-1].finish_reason == every[-1].finish_reason
    assert merged[-1].num_generated_tokens == every[-1].num_generated_tokens


async def test_choices_from_an_idle_engine_share_one_prefill(engine: LLMEngine) -> None:
    """generate_choices queues the n choices in one message: one group, one prefill row."""
    prefill_rows: list[int] = []
    real_forward = engine.runner.model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        if kwargs["input_ids"].shape[1] > 1:  # a prefill, not a decode step
            prefill_rows.append(int(kwargs["input_ids"].shape[0]))
        return real_forward(*args, **kwargs)

    engine.runner.model.forward = spy  # type: ignore[method-assign]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=6) for i in range(3)]
    texts = ["", "", ""]
    ids = prompt_ids(engine, PROMPTS[0])
    async for index, output in engine.generate_choices("n", ids, params):
        texts[index] += output.text
    assert prefill_rows == [1] and all(texts)
    alone = await collect(engine, "seed-1", PROMPTS[0], temperature=1.0, seed=1, max_tokens=6)
    assert texts[1] == joined(alone)  # a choice is the request it would be on its own
