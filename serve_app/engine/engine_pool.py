"""Several engine processes behind one replica (`data_parallel_size`), as vLLM's data parallel
engines: each request runs whole in one of them, and the replica sees one engine.

Why: on a CPU, one engine's step on two threads meets at a barrier hundreds of times a step,
and a core that Ray's processes preempt stalls both (served c=16 0.88-1.00x of one thread,
docs/benchmarks.md, session 21); two one-thread engines never wait for each other. Each keeps
its own KV and prefix cache, so a request goes where its prompt's start was computed
(`rank_replicas` of serve_app/prefix_affinity.py, on token blocks here), unless that engine
has 4 more requests in flight than the least busy one; otherwise to the least busy.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import contextmanager

from serve_app.engine.engine_client import EngineClient, RemoteGrammar
from serve_app.engine.prefix_cache import BLOCK_TOKENS, block_hashes
from serve_app.engine.types import Constraint, EngineStats, RequestOutput, SamplingParams
from serve_app.prefix_affinity import MAX_BLOCKS, PrefixIndex, rank_replicas


class EnginePool:
    """EngineClient's contract over several engine processes of one model."""

    def __init__(self, engines: list[EngineClient]) -> None:
        self.engines = engines
        first = engines[0]
        self.tokenizer = first.tokenizer
        self.max_model_len: int = first.max_model_len
        self.vocab_size: int = first.vocab_size
        self._index = PrefixIndex()
        self._in_flight = [0] * len(engines)  # requests (choices count once) per engine
        self._engine_of: dict[str, int] = {}  # request id -> engine, while in flight

    # ---- health and stats ---------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The first engine's (the stats endpoint's `engine_pid`); `pids` lists them all."""
        return self.engines[0].pid

    @property
    def pids(self) -> list[int | None]:
        return [engine.pid for engine in self.engines]

    @property
    def is_alive(self) -> bool:
        """All of them: one dead engine fails the replica's health check, so Ray replaces it."""
        return all(engine.is_alive for engine in self.engines)

    @property
    def is_busy(self) -> bool:
        return any(engine.is_busy for engine in self.engines)

    def is_stuck(self, max_step_seconds: float) -> bool:
        return any(engine.is_stuck(max_step_seconds) for engine in self.engines)

    def stats(self) -> EngineStats:
        """The engines' counts added up; running ids of all."""
        total = EngineStats()
        for stats in (engine.stats() for engine in self.engines):
            total.num_running += stats.num_running
            total.num_waiting += stats.num_waiting
            total.num_finished += stats.num_finished
            total.num_aborted += stats.num_aborted
            total.num_steps += stats.num_steps
            total.num_prompt_tokens += stats.num_prompt_tokens
            total.num_cached_prompt_tokens += stats.num_cached_prompt_tokens
            total.running_ids.extend(stats.running_ids)
        return total

    def kill(self) -> None:
        for engine in self.engines:
            engine.kill()

    def shutdown(self) -> None:
        for engine in self.engines:
            engine.shutdown()

    # ---- requests -----------------------------------------------------------------------

    async def compile_grammar(self, constraint: Constraint) -> RemoteGrammar:
        """Compiled in every engine (each caches it), since any of them may run the request."""
        grammars = await asyncio.gather(
            *(engine.compile_grammar(constraint) for engine in self.engines)
        )
        return grammars[0]

    def abort(self, request_id: str) -> None:
        index = self._engine_of.get(request_id)
        if index is not None:
            self.engines[index].abort(request_id)

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        grammar: RemoteGrammar | None = None,
    ) -> AsyncIterator[RequestOutput]:
        with self._placed(request_id, prompt_ids) as engine:
            async for output in engine.generate(request_id, prompt_ids, params, grammar):
                yield output

    async def generate_choices(
        self,
        request_id: str,
        prompt_ids: list[int],
        choice_params: list[SamplingParams],
        grammar: RemoteGrammar | None = None,
    ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """n choices stay in one engine: they share one prefill there."""
        with self._placed(request_id, prompt_ids) as engine:
            choices = engine.generate_choices(request_id, prompt_ids, choice_params, grammar)
            try:
                async for index, output in choices:
                    yield index, output
            finally:
                await choices.aclose()

    @contextmanager
    def _placed(self, request_id: str, prompt_ids: list[int]) -> Iterator[EngineClient]:
        index = self._choose(prompt_ids)
        self._in_flight[index] += 1
        self._engine_of[request_id] = index
        try:
            yield self.engines[index]
        finally:
            self._in_flight[index] -= 1
            self._engine_of.pop(request_id, None)

    def _choose(self, prompt_ids: list[int]) -> int:
        """The engine holding the most leading blocks of the prompt unless much busier, else the
        least busy (ties: the first of `rank_replicas`' shuffled rank, so spread at random)."""
        hashes = block_hashes(prompt_ids[: MAX_BLOCKS * BLOCK_TOKENS])
        indices = list(range(len(self.engines)))
        best_rank = rank_replicas(hashes, indices, self._index, self._in_flight.__getitem__)[0]
        chosen = min(best_rank, key=self._in_flight.__getitem__)
        self._index.add(hashes, chosen)
        return chosen
