"""Chat completions as the chat path answers them: bodies and chunk streams fabricated for the
translated APIs' tests (tests/unit/test_responses_api.py, test_anthropic_api.py)."""

from __future__ import annotations

import json
from typing import Any

# 8 of the 11 prompt tokens came from the model's prefix cache
USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 5,
    "total_tokens": 16,
    "prompt_tokens_details": {"cached_tokens": 8},
}


def completion(
    text: str | None, tool_calls: list[dict[str, Any]] | None = None, finish: str = "stop"
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": USAGE,
    }


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [choice]}  # fmt: skip


def usage_chunk() -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [], "usage": USAGE}  # fmt: skip


def text_chunks(*pieces: str, finish: str = "stop") -> list[dict[str, Any]]:
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": piece}) for piece in pieces]
    return [*chunks, chunk({}, finish), usage_chunk()]


def call_chunks(text: str = "Checking.", parallel: bool = True) -> list[dict[str, Any]]:
    """Text, then a call streamed in pieces, then (parallel) a second call in one piece."""
    first = {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}  # fmt: skip
    second = {"index": 1, "id": "call_2", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}  # fmt: skip
    return [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": text}),
        chunk({"tool_calls": [first]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
        *([chunk({"tool_calls": [second]})] if parallel else []),
        chunk({}, "tool_calls"),
        usage_chunk(),
    ]


def parse_events(body: bytes) -> list[dict[str, Any]]:
    """SSE with `event:` lines (Responses, Messages) -> the payloads; each names its event."""
    events = []
    for block in body.decode().split("\n\n"):
        if block:
            name, data = block.split("\n")
            payload = json.loads(data.removeprefix("data: "))
            assert name == f"event: {payload['type']}"
            events.append(payload)
    return events
