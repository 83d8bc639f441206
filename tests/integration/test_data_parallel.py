"""`data_parallel_size: 2` on a real service: SmolLM2's replica runs two engine processes, a
burst of requests is spread over both, a conversation's next turn goes to the engine whose
prefix cache holds its first turn, and the stats endpoint adds both engines up."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml

from serve_app.config import model_entries, with_models
from tests.conftest import SERVE_CONFIG, running_service

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "smollm2-135m-instruct"


def two_engine_config() -> dict[str, Any]:
    """config/serve.yaml with SmolLM2 only, one replica of two one-thread engines."""
    config = with_models(yaml.safe_load(SERVE_CONFIG.read_text()), {MODEL})
    model_entries(config)[MODEL]["engine"].update(data_parallel_size=2, torch_threads=1)
    return config


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("data_parallel")
    with running_service(workdir, "data_parallel", two_engine_config()) as service_url:
        yield service_url


def stats(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/admin/models/{MODEL}/stats", timeout=30)
    response.raise_for_status()
    return dict(response.json())


async def chat(client: openai.AsyncOpenAI, text: str) -> str:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        temperature=0,
        max_tokens=24,
        stream=True,
    )
    parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    return "".join(parts)


def test_a_burst_runs_on_both_engines_and_the_stats_add_up(url: str) -> None:
    before = stats(url)
    assert len(before["engines"]) == 2
    pids = {engine["engine_pid"] for engine in before["engines"]}
    assert len(pids) == 2 and before["engine_pid"] in pids

    async def burst() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        questions = [f"Name a fruit that is color number {i}." for i in range(6)]
        return await asyncio.gather(*(chat(client, q) for q in questions))

    assert all(asyncio.run(burst()))
    after = stats(url)
    finished = [
        new["num_finished"] - old["num_finished"]
        for old, new in zip(before["engines"], after["engines"], strict=True)
    ]
    assert sum(finished) == after["num_finished"] - before["num_finished"] == 6
    assert min(finished) >= 1, f"requests per engine: {finished}"  # least busy first


def test_a_next_turn_reaches_the_engine_holding_its_first_turn(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    notes = " ".join(f"Shelf {i} holds {i % 7 + 2} blue jars." for i in range(20))
    first = [{"role": "user", "content": f"{notes}\nHow many jars are on shelf 3?"}]
    answer = client.chat.completions.create(
        model=MODEL, messages=first, temperature=0, max_tokens=8
    )
    assert answer.usage is not None
    next_turn = [
        *first,
        {"role": "assistant", "content": answer.choices[0].message.content or ""},
        {"role": "user", "content": "And shelf 4?"},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=next_turn, temperature=0, max_tokens=8
    )
    # The whole first turn came from one engine's prefix cache (the other never saw it).
    assert reply.usage and reply.usage.prompt_tokens_details
    assert reply.usage.prompt_tokens_details.cached_tokens >= answer.usage.prompt_tokens
