"""POST /v1/messages over chat completions: translation both ways, and the anthropic SDK reading it.

The SDK sends its real request body to a mock transport; the handler translates it with
serve_app.anthropic_api (and .anthropic_stream), fabricates what the chat path would answer,
and translates that back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic import types
from pydantic import ValidationError

from serve_app.anthropic_api import (
    MessagesRequest,
    anthropic_error,
    chat_body_from_messages,
    message_from_chat,
    new_message_id,
)
from serve_app.anthropic_stream import MessagesStream
from serve_app.protocol import ChatCompletionRequest
from tests.unit.chat_completions import (
    call_chunks,
    chunk,
    completion,
    parse_events,
    text_chunks,
    tool_call,
)

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def request(**fields: Any) -> MessagesRequest:
    body = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    return MessagesRequest.model_validate({**body, **fields})


def sse(req: MessagesRequest, chunks: list[dict[str, Any]]) -> bytes:
    stream = MessagesStream(req, new_message_id())
    events = [event for item in chunks for event in stream.feed(item)] + stream.close()
    return "".join(events).encode()


Fabricate = Callable[[MessagesRequest, dict[str, Any]], "dict[str, Any] | list[dict[str, Any]]"]


class Server:
    """The mock /v1/messages: records the chat body made of what the SDK sent."""

    def __init__(self, fabricate: Fabricate) -> None:
        self.fabricate = fabricate
        self.chat_bodies: list[dict[str, Any]] = []

    def __call__(self, http_request: httpx2.Request) -> httpx2.Response:
        assert http_request.url.path == "/v1/messages"
        req = MessagesRequest.model_validate(json.loads(http_request.content))
        body = chat_body_from_messages(req)
        self.chat_bodies.append(body)
        if not any(key in body for key in ("tools", "tool_choice")) and all(
            "tool_calls" not in m and m["role"] != "tool" for m in body["messages"]
        ):
            ChatCompletionRequest.model_validate(body)  # what the chat route accepts today
        answer = self.fabricate(req, body)
        if isinstance(answer, list):
            headers = {"content-type": "text/event-stream"}
            return httpx2.Response(200, content=sse(req, answer), headers=headers)
        return httpx2.Response(200, json=message_from_chat(answer, req, new_message_id()))


def sdk(server: Server) -> anthropic.Anthropic:
    http_client = httpx2.Client(transport=httpx2.MockTransport(server))
    return anthropic.Anthropic(base_url="http://test", api_key="x", http_client=http_client)


# ---- request translation ----------------------------------------------------------------


def test_system_sampling_and_stop_sequences_become_a_valid_chat_body() -> None:
    req = request(
        system="Be brief.",
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        stop_sequences=["\n\n", "END"],
        metadata={"user_id": "u1"},
    )
    body = chat_body_from_messages(req)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    chat = ChatCompletionRequest.model_validate(body)
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.top_k) == (64, 0.5, 0.9, 40)
    assert chat.stop_strings() == ("\n\n", "END") and chat.user == "u1"


def test_streaming_asks_the_chat_path_for_usage() -> None:
    chat = ChatCompletionRequest.model_validate(chat_body_from_messages(request(stream=True)))
    assert chat.stream and chat.include_usage


def test_text_blocks_and_system_blocks_keep_their_parts() -> None:
    blocks = [{"type": "text", "text": "a", "cache_control": {"type": "ephemeral"}},
              {"type": "text", "text": "b"}]  # fmt: skip
    req = request(system=blocks, messages=[{"role": "user", "content": blocks}])
    body = chat_body_from_messages(req)
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert body["messages"] == [
        {"role": "system", "content": parts},
        {"role": "user", "content": parts},
    ]
    ChatCompletionRequest.model_validate(body)


def test_tool_use_becomes_tool_calls_and_tool_results_become_tool_messages() -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "t1", "name": "w", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "t2", "name": "w", "input": {"city": "Zürich"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "t2", "is_error": True,
             "content": [{"type": "text", "text": "no data"}]},
            {"type": "text", "text": "and tomorrow?"},
        ]},
    ]  # fmt: skip
    chat = chat_body_from_messages(request(messages=messages))["messages"]
    assert chat[1] == {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            {"id": "t1", "type": "function",
             "function": {"name": "w", "arguments": '{"city": "Paris"}'}},
            {"id": "t2", "type": "function",
             "function": {"name": "w", "arguments": '{"city": "Zürich"}'}},
        ],
    }  # fmt: skip
    assert chat[2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "t2", "content": "Error: no data"},
        {"role": "user", "content": [{"type": "text", "text": "and tomorrow?"}]},
    ]


def test_an_assistant_turn_of_only_tool_use_has_null_content() -> None:
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "w",
                                           "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
    ]  # fmt: skip
    chat = chat_body_from_messages(request(messages=messages))["messages"]
    assert chat[1]["content"] is None
    assert json.loads(chat[1]["tool_calls"][0]["function"]["arguments"]) == {}
    assert chat[2] == {"role": "tool", "tool_call_id": "t", "content": ""}
    assert len(chat) == 3  # no empty user message after the results


def test_tools_in_the_chat_wire_format() -> None:
    body = chat_body_from_messages(request(tools=[WEATHER_TOOL]))
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": WEATHER_TOOL["input_schema"],
            },
        }
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "get_weather"},
         {"type": "function", "function": {"name": "get_weather"}}),
    ],
)  # fmt: skip
def test_tool_choice_maps_to_chat(choice: dict[str, Any], expected: Any) -> None:
    body = chat_body_from_messages(request(tools=[WEATHER_TOOL], tool_choice=choice))
    assert body["tool_choice"] == expected and "parallel_tool_calls" not in body


def test_disable_parallel_tool_use_turns_parallel_tool_calls_off() -> None:
    choice = {"type": "any", "disable_parallel_tool_use": True}
    body = chat_body_from_messages(request(tools=[WEATHER_TOOL], tool_choice=choice))
    assert body["parallel_tool_calls"] is False


# ---- refusals: pydantic errors whose location names the field (the ingress's 400 param) ----


def refusal(**fields: Any) -> tuple[tuple[Any, ...], str]:
    with pytest.raises(ValidationError) as caught:
        request(**fields)
    first = caught.value.errors()[0]
    return first["loc"], first["msg"]


@pytest.mark.parametrize("kind", ["image", "document", "thinking", "server_tool_use"])
def test_non_text_blocks_are_refused_naming_them(kind: str) -> None:
    content = [{"type": "text", "text": "look"}, {"type": kind}]
    loc, msg = refusal(messages=[{"role": "user", "content": content}])
    assert loc[:2] == ("messages", 0)
    assert f"content (text-only models)[1]: type '{kind}' is not supported" in msg


def test_an_image_in_a_tool_result_is_refused() -> None:
    result = {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}
    loc, msg = refusal(messages=[{"role": "user", "content": [result]}])
    assert loc[:2] == ("messages", 0) and "type 'image' is not supported" in msg


def test_thinking_is_refused_unless_disabled() -> None:
    loc, msg = refusal(thinking={"type": "enabled", "budget_tokens": 1024})
    assert loc == ("thinking",) and "thinking is not supported" in msg
    assert request(thinking={"type": "disabled"}).thinking is None


def test_server_tools_are_refused_naming_tools() -> None:
    loc, msg = refusal(tools=[WEATHER_TOOL, {"type": "web_search_20250305", "name": "web_search"}])
    assert loc == ("tools",) and "type 'web_search_20250305' is not supported" in msg
    assert request(tools=[{**WEATHER_TOOL, "type": "custom"}]).tools


def test_blocks_in_the_wrong_role_are_refused() -> None:
    tool_use = {"type": "tool_use", "id": "t", "name": "w", "input": {}}
    loc, msg = refusal(messages=[{"role": "user", "content": [tool_use]}])
    assert loc == ("messages", 0) and "tool_use blocks do not belong in user messages" in msg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stop_sequences", ["a", "b", "c", "d", "e"]),
        ("stop_sequences", [""]),
        ("temperature", 1.5),  # Anthropic's range is 0-1
        ("max_tokens", 0),
        ("top_k", -1),
        ("tool_choice", {"type": "tool"}),  # no name
        ("service_tier", "auto"),
        ("mcp_servers", []),
    ],
)
def test_unsupported_or_invalid_fields_name_themselves(field: str, value: Any) -> None:
    loc, _ = refusal(**{field: value})
    assert loc[0] == field


def test_max_tokens_is_required() -> None:
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ValidationError) as caught:
        MessagesRequest.model_validate({"model": "m", "messages": messages})
    assert caught.value.errors()[0]["loc"] == ("max_tokens",)


# ---- response translation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use")],
)
def test_finish_reasons_map_to_stop_reasons(finish: str, stop_reason: str) -> None:
    message = message_from_chat(completion("x", finish=finish), request(), "msg_1")
    assert message["stop_reason"] == stop_reason and message["stop_sequence"] is None


def test_arguments_that_are_not_a_json_object_are_an_error() -> None:
    for arguments in ("{not json", "[1]"):
        broken = completion(None, [tool_call("c", "w", arguments)], "tool_calls")
        with pytest.raises(ValueError, match="arguments of the call to 'w'"):
            message_from_chat(broken, request(), "msg_1")


def test_openai_error_types_map_to_anthropic_ones() -> None:
    cases = {
        "invalid_request_error": "invalid_request_error",
        "rate_limit_error": "rate_limit_error",
        "service_unavailable": "overloaded_error",
        "timeout": "timeout_error",
        "server_error": "api_error",
    }
    for ours, theirs in cases.items():
        body = anthropic_error({"message": "m", "type": ours, "param": None, "code": None})
        assert body == {"type": "error", "error": {"type": theirs, "message": "m"}}
    missing = {"message": "m", "type": "invalid_request_error", "code": "model_not_found"}
    assert anthropic_error(missing)["error"]["type"] == "not_found_error"


# ---- the anthropic SDK reading non-streamed messages ------------------------------------


def test_sdk_create_gives_text_stop_reason_and_usage() -> None:
    server = Server(lambda req, body: completion("Hello there."))
    message = sdk(server).messages.create(
        model="m", max_tokens=32, system="Be nice.", messages=[{"role": "user", "content": "hi"}]
    )
    assert message.id.startswith("msg_") and message.role == "assistant"
    (block,) = message.content
    assert isinstance(block, types.TextBlock) and block.text == "Hello there."
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    # Anthropic counts the prompt tokens read from the cache apart from input_tokens.
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 5)
    assert message.usage.cache_read_input_tokens == 8
    assert server.chat_bodies[0]["messages"][0] == {"role": "system", "content": "Be nice."}
    assert server.chat_bodies[0]["max_tokens"] == 32


def test_sdk_create_gives_tool_use_blocks_and_the_round_trip_goes_back_in() -> None:
    calls = [tool_call("call_9", "get_weather", '{"city": "Paris"}')]
    server = Server(lambda req, body: completion("Let me look.", calls, "tool_calls"))
    client = sdk(server)
    question: types.MessageParam = {"role": "user", "content": "weather?"}
    first = client.messages.create(
        model="m",
        max_tokens=32,
        messages=[question],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    )
    assert first.stop_reason == "tool_use"
    text, tool_use = first.content
    assert isinstance(text, types.TextBlock) and text.text == "Let me look."
    assert isinstance(tool_use, types.ToolUseBlock)
    assert (tool_use.id, tool_use.name) == ("call_9", "get_weather")
    assert tool_use.input == {"city": "Paris"}

    server.fabricate = lambda req, body: completion("Sunny.")
    result: types.ToolResultBlockParam = {"type": "tool_result", "tool_use_id": tool_use.id,
                                          "content": "sunny"}  # fmt: skip
    second = client.messages.create(
        model="m",
        max_tokens=32,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        messages=[question, {"role": "assistant", "content": first.content},
                  {"role": "user", "content": [result]}],
    )  # fmt: skip
    assert isinstance(second.content[0], types.TextBlock) and second.content[0].text == "Sunny."
    chat = server.chat_bodies[1]["messages"]
    assert chat[1]["tool_calls"][0]["id"] == "call_9"
    assert json.loads(chat[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert chat[2] == {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}


def test_sdk_reads_max_tokens() -> None:
    server = Server(lambda req, body: completion("trunc", finish="length"))
    message = sdk(server).messages.create(
        model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.stop_reason == "max_tokens"


# ---- the anthropic SDK reading streamed messages ----------------------------------------


def test_sdk_stream_helper_gives_text_stream_and_final_message() -> None:
    server = Server(lambda req, body: text_chunks("Hel", "lo", " there"))
    with sdk(server).messages.stream(
        model="m", max_tokens=32, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == ["Hel", "lo", " there"]
    assert isinstance(final.content[0], types.TextBlock) and final.content[0].text == "Hello there"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 5)
    assert final.usage.cache_read_input_tokens == 8
    assert server.chat_bodies[0]["stream_options"] == {"include_usage": True}


def test_sdk_stream_helper_accumulates_tool_use_input() -> None:
    server = Server(lambda req, body: call_chunks())
    with sdk(server).messages.stream(
        model="m", max_tokens=32, messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
    ) as stream:  # fmt: skip
        final = stream.get_final_message()
    text, paris, rome = final.content
    assert isinstance(text, types.TextBlock) and text.text == "Checking."
    assert isinstance(paris, types.ToolUseBlock) and isinstance(rome, types.ToolUseBlock)
    assert (paris.id, paris.name, paris.input) == ("call_1", "get_weather", {"city": "Paris"})
    assert (rome.id, rome.input) == ("call_2", {"city": "Rome"})
    assert final.stop_reason == "tool_use"


def test_sdk_raw_stream_has_the_event_sequence() -> None:
    server = Server(lambda req, body: text_chunks("a", "b", finish="length"))
    events = list(
        sdk(server).messages.create(
            model="m", max_tokens=2, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the ping in between is skipped by the SDK
    delta = events[-2]
    assert isinstance(delta, types.RawMessageDeltaEvent)
    assert delta.delta.stop_reason == "max_tokens" and delta.usage.output_tokens == 5


def test_stream_framing_blocks_and_indexes() -> None:
    events = parse_events(sse(request(), call_chunks()))
    assert [e["type"] for e in events[:2]] == ["message_start", "ping"]
    start = events[0]["message"]
    assert start["content"] == [] and start["usage"]["input_tokens"] == 0
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [(e["index"], e["content_block"]["type"]) for e in starts] == [
        (0, "text"),
        (1, "tool_use"),
        (2, "tool_use"),
    ]
    assert starts[1]["content_block"] == {"type": "tool_use", "id": "call_1",
                                          "name": "get_weather", "input": {}}  # fmt: skip
    kinds = [e["type"] for e in events]
    # one block open at a time: each start follows the previous block's stop
    for start_event in starts[1:]:
        position = events.index(start_event)
        assert kinds[position - 1] in ("content_block_stop", "content_block_delta")
        assert kinds[:position].count("content_block_stop") == start_event["index"]
    partial = [e["delta"]["partial_json"] for e in events
               if e["type"] == "content_block_delta" and e["index"] == 1]  # fmt: skip
    assert "".join(partial) == '{"city": "Paris"}'
    assert events[-1] == {"type": "message_stop"}


def test_sdk_raises_on_a_mid_stream_error() -> None:
    error = {"error": {"message": "engine died", "type": "server_error", "param": None,
                       "code": None}}  # fmt: skip
    server = Server(lambda req, body: [chunk({"content": "par"}), error])
    with pytest.raises(anthropic.APIStatusError, match="engine died"):  # noqa: SIM117
        with sdk(server).messages.stream(
            model="m", max_tokens=32, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            stream.get_final_message()


def test_the_error_event_is_anthropic_shaped_and_ends_the_stream() -> None:
    stream = MessagesStream(request(stream=True), "msg_1")
    stream.feed(chunk({"content": "x"}))
    error = {"message": "overloaded", "type": "service_unavailable", "param": None, "code": None}
    (event,) = stream.feed({"error": error})
    assert event.startswith("event: error\ndata: ")
    assert json.loads(event.split("data: ", 1)[1]) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "overloaded"},
    }
    assert stream.feed(chunk({"content": "late"})) == [] and stream.close() == []


def test_a_stream_cut_before_its_finish_errors_on_close() -> None:
    stream = MessagesStream(request(stream=True), "msg_1")
    stream.feed(chunk({"content": "x"}))
    (event,) = stream.close()
    assert json.loads(event.split("data: ", 1)[1])["error"]["type"] == "api_error"


def test_close_after_a_finish_without_usage_ends_the_message() -> None:
    stream = MessagesStream(request(stream=True), "msg_1")
    stream.feed(chunk({"content": "x"}, "stop"))
    kinds = [json.loads(e.split("data: ", 1)[1])["type"] for e in stream.close()]
    assert kinds == ["message_delta", "message_stop"]
