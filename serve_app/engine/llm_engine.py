"""Continuous-batching generation: one inference thread owns the model; asyncio gets the tokens.

Requests join the running batch between decode steps (after a prefill) and leave as soon as
they finish or are aborted, so a new request never waits for the batch in flight. Each
iteration is one `step()`: the Scheduler picks this iteration's prefill (scheduler.py), the
ModelRunner runs it and one decode step of every running row (model_runner.py), and the
OutputProcessor turns the sampled ids into outputs (output_processor.py). This file is the loop
and the bridge between the inference thread and the callers' asyncio loops.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

import torch

from serve_app.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from serve_app.engine.grammar import CompiledGrammar, GrammarCompiler, GrammarError
from serve_app.engine.inference_thread import InferenceThread
from serve_app.engine.model_runner import ModelRunner, release_free_memory
from serve_app.engine.output_processor import OutputProcessor
from serve_app.engine.output_streams import read_choices, read_outputs
from serve_app.engine.sampling import Sampled, SamplerState
from serve_app.engine.scheduler import Scheduler, SchedulerOutput
from serve_app.engine.sequence import OutputSink, Sequence
from serve_app.engine.types import (
    Constraint,
    EngineStats,
    FinishReason,
    RequestOutput,
    SamplingParams,
)

logger = logging.getLogger(__name__)

GRAMMAR_TIMEOUT_S = 10.0  # a grammar still compiling after this answers 400 (vLLM #54003)


class LLMEngine:
    """Generates for many requests at once on one model.

    Contract: `generate()` yields RequestOutput deltas for one request; the last one has a
    finish_reason. Closing or cancelling the iterator (or calling `abort`) removes the request
    from the batch before the next decode step and frees its KV memory.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_num_seqs: int,
        max_model_len: int,
        eos_token_ids: set[int],
        max_prefill_tokens: int = 256,
        max_prefill_rows: int | None = None,
        stream_interval: int = 1,
        prefix_cache_tokens: int = 0,
        thread: InferenceThread | None = None,
    ) -> None:
        """`thread`: the one that loaded the model (inference_thread.py says why the step loop
        should run there); a new one when not given."""
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.runner = ModelRunner(model, prefix_cache_tokens=prefix_cache_tokens)
        self.scheduler = Scheduler(
            max_num_seqs=max_num_seqs,
            max_prefill_tokens=max_prefill_tokens,
            max_prefill_rows=max_prefill_rows,
            lookup_prefix=self.runner.lookup_prefix,
        )
        self.processor = OutputProcessor(
            tokenizer, eos_token_ids=eos_token_ids, stream_interval=stream_interval
        )
        self.grammars = GrammarCompiler(tokenizer, self.runner.vocab_size, eos_token_ids)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._num_steps = 0
        self._thread = thread or InferenceThread()
        self._loop: Future[None] | None = None  # the step loop, once started
        self._is_stopping = False
        self.last_step_at = time.monotonic()
        # Called on the inference thread after every iteration, after a prefill that a decode
        # step follows, and once after the loop ends: the engine process (engine_process.py)
        # sends the outputs made since the last call from it.
        self.on_step: Callable[[], None] | None = None

    # ---- public API (any thread) -------------------------------------------------------

    def start(self) -> None:
        self._loop = self._thread.submit(self._run)
        self._thread.stop()  # the loop is its last job

    def shutdown(self) -> None:
        self._is_stopping = True
        self._inbox.put(("stop", None))
        if self._loop is None:
            self._thread.stop()  # never started: nothing else will end it
        self._thread.thread.join(timeout=10)

    @property
    def vocab_size(self) -> int:
        """Width of the model's logits (token ids a request may name)."""
        return self.runner.vocab_size

    @property
    def is_alive(self) -> bool:
        return self._loop is not None and not self._loop.done()

    def is_stuck(self, max_step_seconds: float) -> bool:
        """True when work is pending and the loop has not come round for that long (a hung step)."""
        return self.is_busy and time.monotonic() - self.last_step_at > max_step_seconds

    @property
    def is_busy(self) -> bool:
        """Some request is queued, prefilling or decoding."""
        return self.scheduler.has_requests

    async def compile_grammar(
        self, constraint: Constraint, timeout_s: float = GRAMMAR_TIMEOUT_S
    ) -> CompiledGrammar:
        """Compiles (or finds cached) a structured-output grammar in a worker thread, never on
        the inference thread. Raises GrammarError if invalid or not done within timeout_s."""
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self.grammars.compile, constraint), timeout_s
            )
        except TimeoutError as exc:
            raise GrammarError(
                f"the {constraint.kind} took over {timeout_s:g} s to compile; simplify it"
            ) from exc

    def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: OutputSink,
        grammar: CompiledGrammar | None = None,
    ) -> None:
        """Queues a request; `grammar` (from compile_grammar) constrains its output."""
        self.submit_group([(request_id, prompt_ids, params, sink, grammar)])

    def submit_group(
        self,
        requests: list[tuple[str, list[int], SamplingParams, OutputSink, CompiledGrammar | None]],
    ) -> None:
        """Queues requests in one message, so they join the same step (n choices of a prompt
        share one prefill): each is (request_id, prompt_ids, params, sink, grammar)."""
        self._inbox.put(("add", [self._sequence(*request) for request in requests]))

    def _sequence(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: OutputSink,
        grammar: CompiledGrammar | None,
    ) -> Sequence:
        max_tokens = params.max_tokens or (self.max_model_len - len(prompt_ids))
        return Sequence(
            request_id=request_id,
            prompt_ids=prompt_ids,
            max_tokens=max(1, min(max_tokens, self.max_model_len - len(prompt_ids))),
            sampler=SamplerState(params, self.runner.vocab_size, self.runner.device),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stop_matcher=StopStringMatcher(params.stop),
            sink=sink,
            submitted_at=time.monotonic(),
            grammar=grammar.new_row() if grammar is not None else None,
        )

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        grammar: CompiledGrammar | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if grammar is None and params.constraint is not None:
            grammar = await self.compile_grammar(params.constraint)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(output: RequestOutput) -> None:
            if not loop.is_closed():  # a consumer whose loop is gone has nobody to tell
                loop.call_soon_threadsafe(outputs.put_nowait, output)

        self.submit(request_id, prompt_ids, params, sink, grammar)
        async for output in read_outputs(outputs, lambda: self.abort(request_id)):
            yield output

    async def generate_choices(
        self,
        request_id: str,
        prompt_ids: list[int],
        choice_params: list[SamplingParams],
        grammar: CompiledGrammar | None = None,
    ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """n choices of one prompt ("{request_id}-{i}"), queued in one message so they share
        one prefill; yields (choice index, delta) as they come. Closing it aborts the rest."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

        def sink_of(index: int) -> OutputSink:
            def sink(output: RequestOutput) -> None:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(ready.put_nowait, (index, output))

            return sink

        choice_ids = [f"{request_id}-{i}" for i in range(len(choice_params))]
        self.submit_group(
            [
                (choice_id, prompt_ids, params, sink_of(i), grammar)
                for i, (choice_id, params) in enumerate(zip(choice_ids, choice_params, strict=True))
            ]
        )
        async for index, output in read_choices(ready, choice_ids, self.abort):
            yield index, output

    def stats(self) -> EngineStats:
        scheduler = self.scheduler
        chunked = scheduler.chunked  # read once: the inference thread may clear it meanwhile
        admitted = [*scheduler.running, *([chunked] if chunked else [])]
        return EngineStats(
            num_running=len(admitted),
            num_waiting=len(scheduler.waiting),
            num_finished=self.processor.num_finished,
            num_aborted=self.processor.num_aborted,
            num_steps=self._num_steps,
            num_prompt_tokens=scheduler.num_prompt_tokens,
            num_cached_prompt_tokens=scheduler.num_cached_prompt_tokens,
            running_ids=[seq.request_id for seq in admitted],
        )

    # ---- one iteration (the inference thread; tests call it directly) ------------------

    def step(self) -> None:
        """Takes new requests and aborts, prefills what the scheduler picked, decodes once."""
        self._drain_inbox(block=False)
        if self._prefill(self.scheduler.schedule()) and self.scheduler.running:
            # First tokens go out now, not after the decode step of every running row: a
            # request joining a busy batch would otherwise wait one more step for its first.
            self._after_step()
        if self.scheduler.running:
            self._decode()

    def _prefill(self, plan: SchedulerOutput) -> bool:
        """Runs this iteration's prefill; True when some request got its first token."""
        if plan.group:
            logger.debug("prefill %d requests", len(plan.group))
            first = self.runner.prefill(plan.group)
            self._joined(plan.group, first)
            return True
        if plan.chunk is not None:
            chunk = plan.chunk
            first_of_chunk = self.runner.prefill_chunk(chunk.seq, chunk.start, chunk.end)
            if first_of_chunk is not None:
                self._joined([chunk.seq], first_of_chunk)
                return True
        return False

    def _joined(self, seqs: list[Sequence], first: Sampled) -> None:
        self.scheduler.start_running(seqs)
        self._postprocess(seqs, first)

    def _decode(self) -> None:
        rows = self.scheduler.running
        sampled = self.runner.decode(rows)
        self._num_steps += 1
        self._postprocess(rows, sampled)

    def _postprocess(self, seqs: list[Sequence], sampled: Sampled) -> None:
        """Streams each row's new text; sends final outputs once their rows are freed."""
        finals = []
        rows = zip(seqs, sampled.token_ids, sampled.logprobs, strict=True)
        for seq, token_id, logprobs in rows:
            output = self.processor.append_token(seq, token_id, logprobs)
            if seq.is_finished:
                finals.append((seq, output))
            elif output is not None:
                seq.sink(output)
        if finals:
            self._free_finished(finals)

    def _free_finished(self, finals: list[tuple[Sequence, RequestOutput | None]]) -> None:
        """Frees finished rows' KV memory (caching answers first), then sends final outputs."""
        for row, seq in enumerate(self.scheduler.running):
            if seq.is_finished and seq.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                self.runner.remember_answer(row, seq)
        self.runner.keep_rows(self.scheduler.free_finished())
        for seq, output in finals:
            if output is not None:
                seq.sink(output)

    # ---- the inference thread ----------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._is_stopping:
                self._drain_inbox(block=not self.is_busy)
                self.last_step_at = time.monotonic()
                was_busy = self.is_busy
                try:
                    self.step()
                except Exception as exc:  # a failed step fails its requests, not the replica
                    logger.exception("engine step failed")
                    self._fail_all(f"engine error: {exc}")
                if was_busy and not self.is_busy:
                    release_free_memory()
                self._after_step()
        finally:
            # Whatever ended the loop, nobody in flight is left waiting for a token.
            self._fail_all("the inference thread stopped")
            self._after_step()

    def _after_step(self) -> None:
        if self.on_step is not None:
            self.on_step()

    def _drain_inbox(self, block: bool) -> None:
        try:
            command, arg = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if command == "add":  # one or more sequences (n choices arrive together)
                for seq in arg:
                    self.scheduler.add(seq)
            elif command == "abort":
                self.scheduler.abort(arg)
            try:
                command, arg = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._remove_aborted()

    def _remove_aborted(self) -> None:
        aborted = self.scheduler.take_aborted()
        finals: list[tuple[Sequence, RequestOutput | None]] = []
        for seq in aborted:
            self.runner.release(seq)  # a chunked prefill's partial KV is simply dropped
            finals.append((seq, self.processor.finish(seq, FinishReason.ABORT)))
        if finals:
            self._free_finished(finals)

    def _fail_all(self, message: str) -> None:
        unfinished = self.scheduler.clear()
        self.runner.reset()
        for seq in unfinished:
            seq.sink(self.processor.finish(seq, FinishReason.ERROR, error=message))
