"""One Ray Serve deployment per LLM: a thin shim that feeds the replica's engine.

The ingress calls `generate` through a streaming handle; the first event says whether the call
was admitted (prompt token count) or rejected (an API error), then engine deltas follow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray import serve

from deployments.metrics import RequestTimer, record_engine_stats
from deployments.model_replica import ModelReplica
from serve_app.config import ModelConfig
from serve_app.engine.types import GrammarError, RequestOutput, SamplingParams
from serve_app.errors import APIError, InvalidRequestError, ServiceUnavailableError
from serve_app.openai_adapter import (
    Admitted,
    ChoiceOutput,
    GenerateCall,
    Rejected,
    decode_ids,
    encode_prompt,
    prompt_token_ids,
)
from serve_app.reasoning import ReasoningParser, reasoning_splitter

if TYPE_CHECKING:
    from serve_app.engine.engine_client import EngineClient
    from serve_app.engine.engine_pool import EnginePool
    from serve_app.engine.llm_engine import LLMEngine

    Engine = LLMEngine | EngineClient | EnginePool
    # What the engine's compile_grammar returned (CompiledGrammar or RemoteGrammar), handed
    # back to the same engine's generate unopened.
    Grammar = Any

logger = logging.getLogger(__name__)

# A step that has not come back for this long means the inference thread is stuck.
_MAX_STEP_SECONDS = 120.0
# SERVE_APP_ENGINE_PROCESS=0 runs the engine in the replica's process (an inference thread),
# as before the split; a model option `engine_process` (when config.py has it) overrides it.
ENGINE_PROCESS_ENV = "SERVE_APP_ENGINE_PROCESS"


@serve.deployment
class LLMServer(ModelReplica["Engine"]):
    def __init__(self, model_config: dict[str, Any], cache_dir: str) -> None:
        self._load(model_config, cache_dir, _engine_builder(model_config))

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None and hasattr(engine, "kill"):
            engine.kill()  # the child also dies with this process (engine_process.py)

    async def generate(
        self, call: GenerateCall
    ) -> AsyncIterator[Admitted | Rejected | RequestOutput | ChoiceOutput]:
        """Admitted (or Rejected), then the engine's deltas: RequestOutputs for one choice,
        ChoiceOutputs (interleaved as they come) for n > 1."""
        try:
            engine = self._running_engine()
            prompt_ids = await self._off_loop(
                prompt_token_ids, call, engine.tokenizer, engine.max_model_len
            )
            _check_logit_bias(call.sampling, engine.vocab_size)
            grammar = await _compiled_grammar(engine, call)
        except APIError as exc:
            yield Rejected.from_error(exc)
            return
        params = call.sampling
        if params.max_tokens is None and self.config.engine.default_max_tokens:
            params = dataclasses.replace(params, max_tokens=self.config.engine.default_max_tokens)
        yield Admitted(len(prompt_ids), echo_text=_echo_text(call, prompt_ids, engine.tokenizer))
        record_engine_stats(self.config.id, engine.stats())
        try:
            if call.num_choices == 1:
                async for output in self._timed(
                    engine, call.request_id, prompt_ids, params, grammar, self._reasoning(call)
                ):
                    yield output
            else:
                async for choice in self._choices(engine, call, prompt_ids, params, grammar):
                    yield choice
        finally:
            record_engine_stats(self.config.id, engine.stats())

    def _running_engine(self) -> Engine:
        engine = self._ready_engine()
        if not engine.is_alive:  # check_health fails too: Ray is replacing this replica
            raise ServiceUnavailableError(
                f"Model '{self.config.id}' is restarting: its engine stopped",
                code="model_unavailable",
            )
        return engine

    async def _timed(
        self,
        engine: Engine,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        grammar: Grammar | None,
        reasoning: ReasoningParser | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """One engine request, its latencies recorded; with a reasoning parser each delta's
        `<think>` text is cut out of `text` into `reasoning` (serve_app/reasoning.py)."""
        timer = RequestTimer(self.config.id)
        splitter = reasoning_splitter(reasoning)
        try:
            async for output in engine.generate(request_id, prompt_ids, params, grammar):
                timer.observe(output)
                yield output if splitter is None else splitter.split(output)
        finally:
            if not timer.is_finished:  # the client went away (or the ingress gave up)
                timer.cancelled()

    async def _choices(
        self,
        engine: Engine,
        call: GenerateCall,
        prompt_ids: list[int],
        params: SamplingParams,
        grammar: Grammar | None,
    ) -> AsyncIterator[ChoiceOutput]:
        """n choices queued together (so one prefill serves them all), their outputs
        interleaved as they come. A seeded request seeds choice i with seed + i."""
        seeds = [None if params.seed is None else params.seed + i for i in range(call.num_choices)]
        choice_params = [dataclasses.replace(params, seed=seed) for seed in seeds]
        timers = [RequestTimer(self.config.id) for _ in choice_params]
        splitters = [reasoning_splitter(self._reasoning(call)) for _ in choice_params]
        choices = engine.generate_choices(call.request_id, prompt_ids, choice_params, grammar)
        try:
            async for index, output in choices:
                timers[index].observe(output)
                splitter = splitters[index]
                yield ChoiceOutput(index, output if splitter is None else splitter.split(output))
        finally:
            await choices.aclose()  # aborts the choices still running
            for timer in timers:
                if not timer.is_finished:
                    timer.cancelled()

    def _reasoning(self, call: GenerateCall) -> ReasoningParser | None:
        """The model's reasoning parser, for chat calls only (completions stay raw, as vLLM's)."""
        return self.config.engine.reasoning_parser if call.endpoint == "chat" else None

    async def tokenize(
        self, call: GenerateCall, add_special_tokens: bool
    ) -> dict[str, Any] | Rejected:
        """/tokenize: the prompt's ids as generation would see them (no context check)."""
        try:
            engine = self._ready_engine()
            ids = await self._off_loop(encode_prompt, call, engine.tokenizer, add_special_tokens)
        except APIError as exc:
            return Rejected.from_error(exc)
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    async def detokenize(self, token_ids: list[int]) -> dict[str, Any] | Rejected:
        try:
            engine = self._ready_engine()
            text = await self._off_loop(decode_ids, token_ids, engine.tokenizer)
        except APIError as exc:
            return Rejected.from_error(exc)
        return {"prompt": text}

    async def stats(self) -> dict[str, Any]:
        if self.engine is None:
            return {"error": self.load_error, "pid": os.getpid()}
        engine_pid = getattr(self.engine, "pid", os.getpid())  # the engine process's, if any
        stats = dataclasses.asdict(self.engine.stats())
        report = {**stats, "pid": os.getpid(), "engine_pid": engine_pid}
        engines = getattr(self.engine, "engines", None)  # an EnginePool: each engine's own too
        if engines is not None:
            report["engines"] = [
                {**dataclasses.asdict(engine.stats()), "engine_pid": engine.pid}
                for engine in engines
            ]
        return report

    def check_health(self) -> None:
        """Ray calls this periodically; raising makes Ray replace the replica."""
        engine = self.engine
        if engine is None:
            return
        if not engine.is_alive:
            raise RuntimeError(f"{self.config.id}: inference thread died")
        if engine.is_stuck(_MAX_STEP_SECONDS):
            if hasattr(engine, "kill"):  # a hung engine process: its requests end with errors
                engine.kill()
            raise RuntimeError(f"{self.config.id}: inference thread stuck")


def _engine_builder(model_config: dict[str, Any]) -> Callable[..., Engine]:
    """EngineClient (an engine process per replica) unless the model or the environment asks
    for the engine in this process. Imported here: torch and transformers load in the replica
    only, not in the Serve controller's app-building task (4 apps built in parallel on 2 cores:
    ~8 s of warm start)."""
    option = model_config.get("engine", {}).get("engine_process")
    in_child = os.environ.get(ENGINE_PROCESS_ENV, "1") != "0" if option is None else option
    if in_child:
        return _engine_client
    from serve_app.loading import build_llm_engine

    return build_llm_engine


def _engine_client(
    config: ModelConfig, cache_dir: Path, has_gpu: bool
) -> EngineClient | EnginePool:
    """The engine process, forked from this node's zygote when there is one (CPU only); with
    `data_parallel_size` N on CPU, N of them started at once behind an EnginePool."""
    from deployments.engine_zygote import zygote_socket
    from serve_app.engine.engine_client import EngineClient

    zygote = None if has_gpu else zygote_socket()
    size = config.engine.data_parallel_size
    if size > 1 and has_gpu:
        logger.warning("%s: data_parallel_size %d ignored on a GPU replica", config.id, size)
        size = 1
    if size == 1:
        return EngineClient(config, cache_dir, has_gpu, zygote)
    # Here, not above: it imports torch (the prefix cache's block hashes), which a replica of
    # one engine process never loads (~180 MB resident, measured).
    from serve_app.engine.engine_pool import EnginePool

    with ThreadPoolExecutor(max_workers=size) as starting:
        futures = [
            starting.submit(EngineClient, config, cache_dir, has_gpu, zygote, index == 0)
            for index in range(size)
        ]
    errors = [future.exception() for future in futures]
    engines = [f.result() for f, error in zip(futures, errors, strict=True) if error is None]
    for error in errors:
        if error is not None:  # none left running: raised as one engine's failure would be
            for engine in engines:
                engine.kill()
            raise error
    return EnginePool(engines)


def _check_logit_bias(params: SamplingParams, vocab_size: int) -> None:
    unknown = [token_id for token_id, _ in params.logit_bias if token_id >= vocab_size]
    if unknown:
        raise InvalidRequestError(
            f"logit_bias names token {unknown[0]}, but this model's vocabulary has "
            f"{vocab_size} tokens",
            param="logit_bias",
            code="invalid_value",
        )


async def _compiled_grammar(engine: Engine, call: GenerateCall) -> Grammar | None:
    """The request's structured-output grammar, compiled off the loop (400 if refused)."""
    constraint = call.sampling.constraint
    if constraint is None:
        return None
    try:
        return await engine.compile_grammar(constraint)
    except GrammarError as exc:
        raise InvalidRequestError(
            str(exc), param=call.constraint_param, code="invalid_grammar"
        ) from exc


def _echo_text(call: GenerateCall, prompt_ids: list[int], tokenizer: Any) -> str:
    if not call.echo:
        return ""
    if isinstance(call.prompt, str):
        return call.prompt
    return str(tokenizer.decode(prompt_ids))
