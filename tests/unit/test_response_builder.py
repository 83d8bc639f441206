"""The ingress's chunks and bodies: built from the typed models, in OpenAI's exact shapes."""

from __future__ import annotations

import json

from serve_app.engine.types import FinishReason, RequestOutput, TokenLogprob
from serve_app.response_builder import ResponseBuilder, ResponseIds
from serve_app.response_types import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse


def output(
    text: str, num: int, reason: FinishReason | None = None, **extra: object
) -> RequestOutput:
    return RequestOutput("r", text, 5, num, reason, **extra)  # type: ignore[arg-type]


def test_a_chat_stream_sends_role_then_only_what_each_delta_sets() -> None:
    builder = ResponseBuilder(ResponseIds("r", "m", "chat", created=1), 5)
    [role] = builder.first_chunks()
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    chunk = builder.add(0, output("Hel", 1))
    assert chunk is not None and chunk["choices"][0] == {
        "index": 0,
        "delta": {"content": "Hel"},
        "logprobs": None,
        "finish_reason": None,
    }
    last = builder.add(0, output("lo", 2, FinishReason.STOP))
    assert last is not None and last["choices"][0]["finish_reason"] == "stop"
    usage = builder.usage_chunk()
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 7
    for sent in (role, chunk, last, usage):
        ChatCompletionChunk.model_validate(sent)
    body = builder.response()
    ChatCompletionResponse.model_validate(body)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}


def test_usage_reports_the_cached_prompt_tokens_once_for_all_choices() -> None:
    builder = ResponseBuilder(ResponseIds("r", "m", "completions", created=1), 5, 2)
    assert builder.usage().model_dump()["prompt_tokens_details"] == {"cached_tokens": 0}
    builder.add(0, output(" a", 1, FinishReason.LENGTH, num_cached_prompt_tokens=4))
    builder.add(1, output(" b", 1, FinishReason.LENGTH, num_cached_prompt_tokens=4))
    body = builder.response()
    CompletionResponse.model_validate(body)
    assert body["usage"]["prompt_tokens"] == 5
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}


def test_tool_calls_stream_as_deltas_and_end_as_a_message() -> None:
    builder = ResponseBuilder(ResponseIds("r", "m", "chat", created=1), 5, has_tools=True)
    answer = json.dumps({"tool_calls": [{"name": "f", "arguments": {"x": 1}}]})
    chunks = [builder.add(0, output(answer[:20], 1)), builder.add(0, output(answer[20:], 2))]
    chunks.append(builder.add(0, output("", 3, FinishReason.STOP)))
    sent = [c for c in chunks if c is not None]
    deltas = [call for c in sent for call in c["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"] == {"name": "f", "arguments": ""} and deltas[0]["id"]
    assert "".join(d["function"]["arguments"] for d in deltas) == '{"x": 1}'
    assert all("content" not in c["choices"][0]["delta"] for c in sent)
    assert sent[-1]["choices"][0]["finish_reason"] == "tool_calls"
    message = builder.response()["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"]["name"] == "f"


def test_completions_with_echo_logprobs_and_two_choices() -> None:
    builder = ResponseBuilder(
        ResponseIds("r", "m", "completions", created=1),
        5,
        2,
        echo_text="Hi",
        has_logprobs=True,
    )
    entry = TokenLogprob(7, " there", -0.5, [(7, " there", -0.5), (8, "!", float("-inf"))])
    assert [c["choices"][0]["text"] for c in builder.first_chunks()] == ["Hi", "Hi"]
    builder.add(1, output(" there", 1, FinishReason.LENGTH, logprobs=[entry]))
    builder.add(0, output(" there", 1, FinishReason.LENGTH, logprobs=[entry]))
    body = builder.response()
    CompletionResponse.model_validate(body)
    assert [c["text"] for c in body["choices"]] == ["Hi there", "Hi there"]
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["text_offset"] == [2] and logprobs["top_logprobs"][0]["!"] == -9999.0
    assert body["usage"]["completion_tokens"] == 2
