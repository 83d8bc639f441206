"""EnginePool on fake engine clients: where requests go (the engine that computed the prompt's
start, unless much busier; else the least busy), aborts reach the right engine, stats add up,
one dead engine makes the pool dead. The real engine processes: tests/integration."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from serve_app.engine.engine_client import EngineClient
from serve_app.engine.engine_pool import EnginePool
from serve_app.engine.types import Constraint, EngineStats, RequestOutput, SamplingParams


class FakeEngine:
    """What EnginePool uses of an EngineClient; generate waits until `release` is set."""

    def __init__(self, pid: int, stats: EngineStats | None = None) -> None:
        self.pid, self.tokenizer, self.max_model_len, self.vocab_size = pid, object(), 64, 100
        self.is_alive, self.is_busy = True, False
        self._stats = stats or EngineStats()
        self.requests: list[str] = []
        self.aborted: list[str] = []
        self.compiled: list[Constraint] = []
        self.release = asyncio.Event()

    def stats(self) -> EngineStats:
        return self._stats

    def is_stuck(self, max_step_seconds: float) -> bool:
        return False

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def compile_grammar(self, constraint: Constraint) -> str:
        self.compiled.append(constraint)
        return f"grammar of {self.pid}"

    async def generate(self, request_id: str, *_: Any) -> AsyncIterator[RequestOutput]:
        self.requests.append(request_id)
        await self.release.wait()
        yield RequestOutput(request_id, "x", 3, 1, None)


def pool_of(*engines: FakeEngine) -> EnginePool:
    return EnginePool(cast(list[EngineClient], list(engines)))


async def start(pool: EnginePool, request_id: str, prompt: list[int]) -> asyncio.Task[Any]:
    async def consume() -> list[RequestOutput]:
        return [o async for o in pool.generate(request_id, prompt, SamplingParams())]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)  # it reaches its engine's generate
    return task


PROMPT_A = list(range(40))  # 5 blocks of 8 tokens
PROMPT_B = list(range(100, 140))


async def test_a_prompt_goes_back_to_the_engine_that_computed_its_start() -> None:
    first, second = FakeEngine(1), FakeEngine(2)
    pool = pool_of(first, second)
    a = await start(pool, "a", PROMPT_A)
    b = await start(pool, "b", PROMPT_B)  # the least busy: the other engine
    assert {tuple(first.requests), tuple(second.requests)} == {("a",), ("b",)}
    holder_of_a = first if first.requests == ["a"] else second
    a_next = await start(pool, "a-next-turn", [*PROMPT_A, 7, 8, 9])
    assert holder_of_a.requests[-1] == "a-next-turn"  # one request busier, still chosen
    first.release.set()
    second.release.set()
    await asyncio.gather(a, b, a_next)


async def test_load_wins_over_a_cached_prefix_past_the_imbalance() -> None:
    first, second = FakeEngine(1), FakeEngine(2)
    pool = pool_of(first, second)
    tasks = [await start(pool, "seed", PROMPT_A)]  # both idle: the first (unshuffled ties)
    for i in range(4):  # the same start: to its engine until it has 4 more in flight
        tasks.append(await start(pool, f"same-{i}", [*PROMPT_A, i]))
    assert first.requests == ["seed", "same-0", "same-1", "same-2"]
    assert second.requests == ["same-3"]
    first.release.set()
    second.release.set()
    await asyncio.gather(*tasks)


async def test_abort_reaches_the_engine_running_the_request() -> None:
    first, second = FakeEngine(1), FakeEngine(2)
    pool = pool_of(first, second)
    task = await start(pool, "r", PROMPT_A)
    pool.abort("r")
    assert (first.aborted, second.aborted) in ((["r"], []), ([], ["r"]))
    pool.abort("unknown")  # finished or never here: nobody to tell
    assert len(first.aborted + second.aborted) == 1
    first.release.set()
    second.release.set()
    await task
    pool.abort("r")  # done now: forgotten
    assert len(first.aborted + second.aborted) == 1


async def test_grammars_compile_in_every_engine() -> None:
    first, second = FakeEngine(1), FakeEngine(2)
    constraint = Constraint("json_schema", {"type": "object"})
    assert await pool_of(first, second).compile_grammar(constraint) == "grammar of 1"
    assert first.compiled == second.compiled == [constraint]


def test_stats_add_up_and_one_dead_engine_makes_the_pool_dead() -> None:
    first = FakeEngine(1, EngineStats(num_running=2, num_finished=5, running_ids=["a", "b"]))
    second = FakeEngine(2, EngineStats(num_running=1, num_aborted=1, running_ids=["c"]))
    pool = pool_of(first, second)
    stats = pool.stats()
    assert (stats.num_running, stats.num_finished, stats.num_aborted) == (3, 5, 1)
    assert stats.running_ids == ["a", "b", "c"]
    assert pool.pid == 1 and pool.pids == [1, 2] and pool.tokenizer is first.tokenizer
    assert pool.is_alive and not pool.is_busy
    second.is_busy = True
    assert pool.is_busy
    second.is_alive = False
    assert not pool.is_alive  # the replica's health check fails: Ray replaces it


@pytest.fixture(autouse=True)
def _no_shuffle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks keep their order, so ties go to the first engine: deterministic placements."""
    from serve_app import prefix_affinity

    monkeypatch.setattr(prefix_affinity, "_shuffled", list)


def test_a_replica_of_one_engine_process_never_imports_torch() -> None:
    """The pool (and the prefix cache's hashes it uses, which import torch) load only for
    data_parallel_size > 1: a replica's resident memory went 182 -> 361 MB when they did."""
    import subprocess
    import sys

    script = """
import sys
from deployments import engine_zygote, llm_server
from serve_app.config import ModelConfig
from serve_app.engine import engine_client
engine_client.EngineClient = lambda *args: "one engine"
engine_zygote.zygote_socket = lambda: None
config = ModelConfig.model_validate(
    {"id": "m", "kind": "chat", "source": "hf://org/m", "engine": {"data_parallel_size": 1}}
)
assert llm_server._engine_client(config, ".", False) == "one engine"
print("torch" in sys.modules)
"""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_an_engine_that_fails_to_start_takes_the_others_down_with_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """data_parallel_size 3, the second engine's load fails: the replica raises that error
    (a missing model stays a 503) and no engine process is left running."""
    from deployments import engine_zygote, llm_server
    from serve_app.config import ModelConfig
    from serve_app.engine import engine_client
    from serve_app.model_store import ModelSourceError

    started: list[FakeEngine] = []
    killed: list[int] = []
    numbering = threading.Lock()  # the clients start in threads of their own

    def fake_client(*args: Any) -> FakeEngine:
        with numbering:
            engine = FakeEngine(len(started) + 1)
            started.append(engine)
        if engine.pid == 2:
            raise ModelSourceError("model file missing")
        engine.kill = lambda: killed.append(engine.pid)  # type: ignore[attr-defined]
        return engine

    monkeypatch.setattr(engine_client, "EngineClient", fake_client)
    monkeypatch.setattr(engine_zygote, "zygote_socket", lambda: None)
    config = ModelConfig.model_validate(
        {"id": "m", "kind": "chat", "source": "hf://org/m", "engine": {"data_parallel_size": 3}}
    )
    with pytest.raises(ModelSourceError, match="model file missing"):
        llm_server._engine_client(config, Path("."), False)
    assert len(started) == 3 and sorted(killed) == [1, 3]
