"""Tokenizing a long prompt happens off the replica's event loop, so its other streams go on;
the embedding server groups inputs by its config's max_batch_size. No Ray: the plain classes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray import serve
from transformers import AutoTokenizer

import serve_app.loading
from deployments.embedding_server import EmbeddingServer
from serve_app.config import EngineOptions, ModelConfig
from serve_app.openai_adapter import Admitted
from tests.unit.test_llm_server import call, make_server

TOKENIZE_S = 0.5
MAX_PAUSE_S = 0.2  # a loop blocked for the whole tokenization would pause >= TOKENIZE_S


class SlowTokenizer:
    """A real tokenizer whose encoding takes TOKENIZE_S of CPU, as a 4 MiB prompt's would."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(TOKENIZE_S)
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(TOKENIZE_S)
        return self._tokenizer(*args, **kwargs)


class FakeEmbeddingEngine:
    """Counts tokens slowly, embeds instantly, and records the size of every group."""

    max_model_len = 512

    def __init__(self, count_s: float = 0.0) -> None:
        self.count_s = count_s
        self.group_sizes: list[int] = []

    def count_tokens(self, texts: list[str]) -> list[int]:
        time.sleep(self.count_s)
        return [len(text.split()) for text in texts]

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.group_sizes.append(len(texts))
        return [[float(len(text))] for text in texts]


async def longest_pause_while(awaitable: Any) -> tuple[Any, float]:
    """(awaitable's result, the longest the event loop went without running a 10 ms ticker)."""
    ticks = [time.monotonic()]

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.01)
            ticks.append(time.monotonic())

    ticker = asyncio.ensure_future(tick())
    try:
        result = await awaitable
    finally:
        ticker.cancel()
    ticks.append(time.monotonic())
    return result, max(b - a for a, b in zip(ticks, ticks[1:], strict=False))


async def test_the_loop_ticks_while_a_long_prompt_tokenizes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server: Any = make_server(str(tmp_path / "absent"), tmp_path)  # no engine thread needed
    tokenizer = SlowTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    server.engine = type(
        "Engine",
        (),
        {"tokenizer": tokenizer, "max_model_len": 512, "vocab_size": 512, "is_alive": True},
    )()
    stream = server.generate(call())
    first, pause = await longest_pause_while(stream.__anext__())
    await stream.aclose()
    assert isinstance(first, Admitted) and first.num_prompt_tokens > 0
    assert pause < MAX_PAUSE_S


def embedding_server(
    monkeypatch: pytest.MonkeyPatch, engine: FakeEmbeddingEngine, max_batch_size: int = 32
) -> Any:
    monkeypatch.setattr(serve_app.loading, "build_embedding_engine", lambda *_: engine)
    # @serve.batch reads the replica's max_ongoing_requests, which only a replica has.
    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    config = ModelConfig(
        id="minilm",
        kind="embedding",
        source="unused",
        engine=EngineOptions(max_batch_size=max_batch_size),
    )
    server_class: Any = EmbeddingServer.func_or_class
    return server_class(config.model_dump(mode="json"), "unused-cache")


async def test_the_loop_ticks_while_embedding_inputs_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = embedding_server(monkeypatch, FakeEmbeddingEngine(count_s=TOKENIZE_S))
    (vectors, num_tokens), pause = await longest_pause_while(server.embed(["a b", "c"]))
    assert vectors == [[3.0], [1.0]] and num_tokens == 3
    assert pause < MAX_PAUSE_S


async def test_inputs_are_grouped_by_the_configured_batch_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = FakeEmbeddingEngine()
    server = embedding_server(monkeypatch, engine, max_batch_size=4)
    texts = [f"text {i}" for i in range(10)]
    vectors, _ = await asyncio.wait_for(server.embed(texts), timeout=30)
    assert vectors == [[float(len(text))] for text in texts]
    assert sum(engine.group_sizes) == 10 and max(engine.group_sizes) == 4
