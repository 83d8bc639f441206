"""`reasoning_parser: think_tags` through real Ray Serve: SmolLM2 alone, forced by a regex into
`<think>...</think>answer`; the reasoning comes back as `reasoning_content` (streamed deltas and
the message), the content holds no tag text, and /v1/completions stays raw."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml

from serve_app.config import model_entries, with_models
from tests.conftest import SERVE_CONFIG, running_service

pytestmark = pytest.mark.integration

CHAT_MODEL = "smollm2-135m-instruct"
THINK_THEN_ANSWER = "<think>[a-z ]{3,30}</think>[A-Za-z ]{3,30}"
ASK = [{"role": "user", "content": "Is the sea blue? Think first."}]
BODY: dict[str, Any] = {
    "model": CHAT_MODEL,
    "messages": ASK,
    "max_tokens": 100,
    "temperature": 0,
    "structured_outputs": {"regex": THINK_THEN_ANSWER},
}


def reasoning_config() -> dict[str, Any]:
    config = with_models(yaml.safe_load(SERVE_CONFIG.read_text()), {CHAT_MODEL})
    model_entries(config)[CHAT_MODEL]["engine"].update(
        reasoning_parser="think_tags", max_num_seqs=4, prefix_cache_tokens=0
    )
    return config


@pytest.fixture(scope="module")
def reasoning_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("reasoning")
    with running_service(workdir, "reasoning", reasoning_config()) as url:
        yield url


def assert_split(reasoning: str, content: str) -> None:
    assert re.fullmatch("[a-z ]{3,30}", reasoning), reasoning
    assert re.fullmatch("[A-Za-z ]{3,30}", content), content


def streamed_deltas(url: str) -> list[dict[str, Any]]:
    """The chat deltas of BODY streamed, read as raw SSE."""
    deltas: list[dict[str, Any]] = []
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=BODY | {"stream": True}, timeout=120
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[len("data: ") :])
                assert "error" not in chunk, chunk
                deltas += [choice["delta"] for choice in chunk["choices"]]
    return deltas


def parts(deltas: list[dict[str, Any]], key: str) -> list[str]:
    return [delta[key] for delta in deltas if delta.get(key)]


def test_streamed_reasoning_and_content_come_as_their_own_deltas(reasoning_url: str) -> None:
    deltas = streamed_deltas(reasoning_url)
    reasoning, content = parts(deltas, "reasoning_content"), parts(deltas, "content")
    assert len(reasoning) >= 2  # streamed as it comes, not once at the end
    assert not any("<" in text or ">" in text for text in reasoning + content)
    assert_split("".join(reasoning), "".join(content))
    assert not any(d.get("reasoning_content") and d.get("content") for d in deltas)
    kinds = ["r" if d.get("reasoning_content") else "c" for d in deltas if _has_text(d)]
    assert "".join(kinds) == "r" * len(reasoning) + "c" * len(content)  # reasoning first


def _has_text(delta: dict[str, Any]) -> bool:
    return bool(delta.get("reasoning_content") or delta.get("content"))


def test_the_message_carries_reasoning_content_through_the_openai_sdk(reasoning_url: str) -> None:
    client = openai.OpenAI(base_url=f"{reasoning_url}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=BODY["max_tokens"],
        temperature=0,
        extra_body={"structured_outputs": BODY["structured_outputs"]},
    )
    message = completion.choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content")
    assert isinstance(reasoning, str) and message.content is not None
    assert_split(reasoning, message.content)
    assert completion.choices[0].finish_reason == "stop"
    deltas = streamed_deltas(reasoning_url)  # greedy: streamed == non-streamed
    assert "".join(parts(deltas, "reasoning_content")) == reasoning
    assert "".join(parts(deltas, "content")) == message.content


def test_completions_are_not_split(reasoning_url: str) -> None:
    body = httpx.post(
        f"{reasoning_url}/v1/completions",
        json={"model": CHAT_MODEL, "prompt": "The sea", "max_tokens": 100, "temperature": 0}
        | {"structured_outputs": BODY["structured_outputs"]},
        timeout=120,
    ).json()
    assert re.fullmatch(THINK_THEN_ANSWER, body["choices"][0]["text"])
    assert "reasoning_content" not in body["choices"][0]
