"""POST /v1/responses over chat completions: translation both ways, and the openai SDK reading it.

The SDK sends its real request body to a mock transport; the handler translates it with
serve_app.responses_api (and .responses_stream), fabricates what the chat path would answer,
and translates that back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2
import openai
import pytest
from openai.types import responses as types
from pydantic import BaseModel, ValidationError

from serve_app.protocol import ChatCompletionRequest
from serve_app.responses_api import (
    ResponsesRequest,
    chat_body_from_responses,
    new_response_id,
    response_from_chat,
)
from serve_app.responses_stream import ResponsesStream
from tests.unit.chat_completions import (
    call_chunks,
    chunk,
    completion,
    parse_events,
    text_chunks,
    tool_call,
)

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}


def request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **fields})


def sse(req: ResponsesRequest, chunks: list[dict[str, Any]]) -> bytes:
    stream = ResponsesStream(req, new_response_id())
    events = [event for item in chunks for event in stream.feed(item)] + stream.close()
    return "".join(events).encode()


Fabricate = Callable[[ResponsesRequest, dict[str, Any]], "dict[str, Any] | list[dict[str, Any]]"]


class Server:
    """The mock /v1/responses: records what the SDK sent and the chat body made of it."""

    def __init__(self, fabricate: Fabricate) -> None:
        self.fabricate = fabricate
        self.chat_bodies: list[dict[str, Any]] = []

    def __call__(self, http_request: httpx2.Request) -> httpx2.Response:
        assert http_request.url.path == "/v1/responses"
        req = ResponsesRequest.model_validate(json.loads(http_request.content))
        body = chat_body_from_responses(req)
        self.chat_bodies.append(body)
        if not any(key in body for key in ("tools", "tool_choice", "response_format")):
            ChatCompletionRequest.model_validate(body)  # what the chat route accepts today
        answer = self.fabricate(req, body)
        if isinstance(answer, list):
            headers = {"content-type": "text/event-stream"}
            return httpx2.Response(200, content=sse(req, answer), headers=headers)
        return httpx2.Response(200, json=response_from_chat(answer, req, new_response_id()))


def sdk(server: Server) -> openai.OpenAI:
    http_client = httpx2.Client(transport=httpx2.MockTransport(server))
    return openai.OpenAI(base_url="http://test/v1", api_key="x", http_client=http_client)


# ---- request translation ----------------------------------------------------------------


def test_text_input_and_instructions_become_a_valid_chat_body() -> None:
    req = request(instructions="Be brief.", max_output_tokens=20, temperature=0.2, top_p=0.9)
    body = chat_body_from_responses(req)
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    chat = ChatCompletionRequest.model_validate(body)
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.stream) == (20, 0.2, 0.9, False)


def test_streaming_asks_the_chat_path_for_usage() -> None:
    chat = ChatCompletionRequest.model_validate(chat_body_from_responses(request(stream=True)))
    assert chat.stream and chat.include_usage


def test_message_items_keep_roles_and_text_parts() -> None:
    items = [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "b", "annotations": []}]},
    ]  # fmt: skip
    body = chat_body_from_responses(request(input=items))
    assert body["messages"] == [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "a"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "b"}]},
    ]
    ChatCompletionRequest.model_validate(body)


def test_function_calls_join_the_assistant_turn_and_outputs_become_tool_messages() -> None:
    items = [
        {"role": "user", "content": "weather in Paris and Rome?"},
        {"type": "message", "role": "assistant", "content": "Checking."},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "w", "arguments": '{"city":"Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "rain"}]},
    ]  # fmt: skip
    messages = chat_body_from_responses(request(input=items))["messages"]
    assert messages[1:] == [
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "w", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "w", "arguments": '{"city":"Rome"}'},
                },
            ],
        },  # fmt: skip
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "rain"},
    ]


def test_a_call_after_a_tool_result_opens_a_new_assistant_message() -> None:
    items = [
        {"role": "user", "content": "q"},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "x"},
        {"type": "function_call", "call_id": "c2", "name": "w", "arguments": "{}"},
    ]
    messages = chat_body_from_responses(request(input=items))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
    assert messages[3]["content"] is None and messages[3]["tool_calls"][0]["id"] == "c2"


def test_tools_tool_choice_and_text_format_in_the_chat_wire_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    text = {"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}}
    req = request(
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"},
        parallel_tool_calls=False,
        text=text,
    )
    body = chat_body_from_responses(req)
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": WEATHER_TOOL["parameters"],
                "strict": True,
            },
        }
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": schema, "strict": True},
    }


@pytest.mark.parametrize("choice", ["none", "auto", "required"])
def test_tool_choice_strings_pass_through(choice: str) -> None:
    assert chat_body_from_responses(request(tool_choice=choice))["tool_choice"] == choice


def test_text_formats_json_object_and_plain_text() -> None:
    json_object = request(text={"format": {"type": "json_object"}})
    assert chat_body_from_responses(json_object)["response_format"] == {"type": "json_object"}
    plain = chat_body_from_responses(request(text={"format": {"type": "text"}}))
    assert "response_format" not in plain
    ChatCompletionRequest.model_validate(plain)


def test_store_is_accepted_and_nothing_is_stored() -> None:
    for store in (True, False):
        req = request(store=store)
        assert "store" not in chat_body_from_responses(req)
        assert response_from_chat(completion("x"), req, "resp_1")["store"] is False


# ---- refusals: pydantic errors whose location names the field (the ingress's 400 param) ----


def refusal(**fields: Any) -> tuple[tuple[Any, ...], str]:
    with pytest.raises(ValidationError) as caught:
        request(**fields)
    first = caught.value.errors()[0]
    return first["loc"], first["msg"]


def test_previous_response_id_is_refused_by_name() -> None:
    loc, msg = refusal(previous_response_id="resp_123")
    assert loc == ("previous_response_id",)
    assert "previous_response_id is not supported" in msg and "stores no responses" in msg


@pytest.mark.parametrize(
    ("field", "value"),
    [("conversation", "conv_1"), ("prompt", {"id": "pmpt_1"}), ("background", True)],
)
def test_stateful_fields_are_refused_by_name(field: str, value: Any) -> None:
    loc, msg = refusal(**{field: value})
    assert loc == (field,) and f"{field} is not supported" in msg


def test_background_false_is_the_no_op_value() -> None:
    assert request(background=False).background is False  # accepted: what we do anyway


@pytest.mark.parametrize("kind", ["web_search", "file_search", "code_interpreter", "mcp"])
def test_built_in_tools_are_refused_naming_tools(kind: str) -> None:
    loc, msg = refusal(tools=[WEATHER_TOOL, {"type": kind}])
    assert loc == ("tools",)
    assert f"tools (built-in tools are not served)[1]: type '{kind}' is not supported" in msg


def test_image_input_is_refused_naming_input() -> None:
    image = {"type": "input_image", "image_url": "http://x/y.png"}
    loc, msg = refusal(input=[{"role": "user", "content": [image]}])
    assert loc[0] == "input" and "content[0]: type 'input_image' is not supported" in msg


def test_a_bad_part_list_reports_the_part_not_the_string_branch() -> None:
    loc, msg = refusal(input=[{"role": "user", "content": [{"type": "input_text"}]}])
    assert loc == ("input", 0, "message", "content", "list[parts]", 0, "text")
    assert msg == "Field required"
    output = [{"type": "input_image", "image_url": "x"}]
    loc, msg = refusal(input=[{"type": "function_call_output", "call_id": "c", "output": output}])
    assert loc[:3] == ("input", 0, "function_call_output")
    assert "output[0]: type 'input_image' is not supported" in msg


def test_unknown_item_types_are_refused_naming_input() -> None:
    loc, msg = refusal(input=[{"type": "reasoning", "id": "rs_1", "summary": []}])
    assert loc == ("input",) and "input[0]: type 'reasoning' is not supported" in msg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reasoning", {"effort": "low"}),
        ("include", ["file_search_call.results"]),
        ("max_output_tokens", 0),
        ("temperature", 3),
        ("top_p", 0),
        ("tool_choice", {"type": "allowed_tools", "tools": []}),
        ("text", {"format": {"type": "json_schema", "schema": {}}}),  # no name
    ],
)
def test_unsupported_or_invalid_fields_name_themselves(field: str, value: Any) -> None:
    loc, _ = refusal(**{field: value})
    assert loc[0] == field


# ---- response translation ---------------------------------------------------------------


def test_a_length_finish_is_incomplete_for_max_output_tokens() -> None:
    response = response_from_chat(completion("abc", finish="length"), request(), "resp_1")
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"


def test_settings_are_echoed() -> None:
    req = request(instructions="i", max_output_tokens=9, metadata={"k": "v"}, user="u",
                  tools=[WEATHER_TOOL], tool_choice="required")  # fmt: skip
    response = response_from_chat(completion("x"), req, "resp_1")
    assert response["instructions"] == "i" and response["max_output_tokens"] == 9
    assert response["metadata"] == {"k": "v"} and response["user"] == "u"
    assert response["tools"] == [WEATHER_TOOL] and response["tool_choice"] == "required"
    assert response["text"] == {"format": {"type": "text"}}
    assert (response["temperature"], response["top_p"], response["parallel_tool_calls"]) == (
        1.0,
        1.0,
        True,
    )


# ---- the openai SDK reading non-streamed responses --------------------------------------


def test_sdk_create_gives_output_text_and_usage() -> None:
    server = Server(lambda req, body: completion("Hello there."))
    response = sdk(server).responses.create(model="m", input="hi", instructions="Be nice.")
    assert response.output_text == "Hello there."
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output[0].type == "message" and response.output[0].id.startswith("msg_")
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (11, 5)
    assert response.usage.total_tokens == 16
    assert response.usage.input_tokens_details.cached_tokens == 8
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert server.chat_bodies[0]["messages"][0] == {"role": "system", "content": "Be nice."}


def test_sdk_create_gives_a_function_call_and_the_round_trip_goes_back_in() -> None:
    calls = [tool_call("call_9", "get_weather", '{"city": "Paris"}')]
    server = Server(lambda req, body: completion(None, calls, "tool_calls"))
    client = sdk(server)
    first = client.responses.create(model="m", input="weather?", tools=[WEATHER_TOOL])  # type: ignore[list-item]
    (call,) = first.output
    assert call.type == "function_call"
    assert (call.call_id, call.name, json.loads(call.arguments)) == (
        "call_9",
        "get_weather",
        {"city": "Paris"},
    )
    assert call.id is not None and call.id.startswith("fc_")
    assert server.chat_bodies[0]["tools"][0]["function"]["name"] == "get_weather"

    server.fabricate = lambda req, body: completion("Sunny in Paris.")
    follow_up: list[Any] = [{"role": "user", "content": "weather?"}, *first.output]
    follow_up.append({"type": "function_call_output", "call_id": "call_9", "output": "sunny"})
    second = client.responses.create(model="m", input=follow_up, tools=[WEATHER_TOOL])  # type: ignore[list-item]
    assert second.output_text == "Sunny in Paris."
    messages = server.chat_bodies[1]["messages"]
    assert messages[1]["tool_calls"][0]["id"] == "call_9"
    assert messages[2] == {"role": "tool", "tool_call_id": "call_9", "content": "sunny"}


def test_sdk_parse_reads_a_json_schema_answer() -> None:
    class City(BaseModel):
        name: str
        population: int

    server = Server(lambda req, body: completion('{"name":"Paris","population":2100000}'))
    parsed = sdk(server).responses.parse(model="m", input="a city", text_format=City)
    assert parsed.output_parsed == City(name="Paris", population=2100000)
    response_format = server.chat_bodies[0]["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["name"] == "City"
    assert response_format["json_schema"]["strict"] is True


def test_sdk_reads_an_incomplete_response() -> None:
    server = Server(lambda req, body: completion("trunc", finish="length"))
    response = sdk(server).responses.create(model="m", input="hi", max_output_tokens=2)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert server.chat_bodies[0]["max_tokens"] == 2


# ---- the openai SDK reading streamed responses ------------------------------------------


def test_sdk_stream_yields_the_typed_events_in_order() -> None:
    server = Server(lambda req, body: text_chunks("Hel", "lo"))
    events = list(sdk(server).responses.create(model="m", input="hi", stream=True))
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert isinstance(events[-1], types.ResponseCompletedEvent)
    final = events[-1].response
    assert final.output_text == "Hello" and final.usage is not None
    assert final.usage.output_tokens == 5
    assert server.chat_bodies[0]["stream_options"] == {"include_usage": True}


def test_sdk_stream_helper_accumulates_text_and_a_function_call() -> None:
    server = Server(lambda req, body: call_chunks("Let me check.", parallel=False))
    with sdk(server).responses.stream(model="m", input="weather?", tools=[WEATHER_TOOL]) as stream:  # type: ignore[list-item]
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in types
    assert types.index("response.output_item.done") < types.index(
        "response.function_call_arguments.done"
    )  # the message closes before the call's arguments end
    assert final.output_text == "Let me check."
    message, call = final.output
    assert message.type == "message" and call.type == "function_call"
    assert (call.call_id, call.name, call.arguments) == (
        "call_1",
        "get_weather",
        '{"city": "Paris"}',
    )
    assert final.status == "completed"


def test_stream_events_carry_item_ids_and_indexes() -> None:
    events = parse_events(sse(request(), call_chunks("Let me check.", parallel=False)))
    by_type = {event["type"]: event for event in events}
    message_id = by_type["response.content_part.added"]["item_id"]
    assert by_type["response.output_text.delta"]["item_id"] == message_id
    call_added = [e for e in events if e["type"] == "response.output_item.added"][1]
    assert call_added["output_index"] == 1
    assert call_added["item"]["arguments"] == "" and call_added["item"]["status"] == "in_progress"
    done = by_type["response.function_call_arguments.done"]
    assert (done["item_id"], done["arguments"]) == (call_added["item"]["id"], '{"city": "Paris"}')
    assert by_type["response.created"]["response"]["output"] == []
    assert by_type["response.created"]["response"]["status"] == "in_progress"


def test_sdk_stream_ends_incomplete_on_length() -> None:
    server = Server(lambda req, body: text_chunks("ab", finish="length"))
    events = list(sdk(server).responses.create(model="m", input="hi", stream=True))
    last, item_done = events[-1], events[-2]
    assert isinstance(last, types.ResponseIncompleteEvent)
    assert last.response.incomplete_details is not None
    assert isinstance(item_done, types.ResponseOutputItemDoneEvent)
    assert isinstance(item_done.item, types.ResponseOutputMessage)
    assert item_done.item.status == "incomplete"


def test_sdk_stream_reports_a_mid_stream_error_then_response_failed() -> None:
    error = {"error": {"message": "engine died", "type": "server_error", "param": None,
                       "code": None}}  # fmt: skip
    server = Server(lambda req, body: [chunk({"content": "par"}), error])
    events = list(sdk(server).responses.create(model="m", input="hi", stream=True))
    assert [event.type for event in events][-2:] == ["error", "response.failed"]
    error_event, failed_event = events[-2:]
    assert isinstance(error_event, types.ResponseErrorEvent)
    assert error_event.message == "engine died"
    assert isinstance(failed_event, types.ResponseFailedEvent)
    failed = failed_event.response
    assert failed.status == "failed" and failed.error is not None
    assert (failed.error.code, failed.error.message) == ("server_error", "engine died")
    (partial,) = failed.output
    assert isinstance(partial, types.ResponseOutputMessage) and partial.status == "in_progress"


def test_a_stream_cut_before_its_finish_fails_on_close() -> None:
    stream = ResponsesStream(request(stream=True), "resp_1")
    stream.feed(chunk({"content": "x"}))
    events = [json.loads(e.split("data: ", 1)[1]) for e in stream.close()]
    assert [e["type"] for e in events] == ["error", "response.failed"]
    assert stream.feed(chunk({"content": "late"})) == [] and stream.close() == []


def test_close_after_a_finish_without_usage_completes() -> None:
    stream = ResponsesStream(request(stream=True), "resp_1")
    stream.feed(chunk({"content": "x"}, "stop"))
    (event,) = [json.loads(e.split("data: ", 1)[1]) for e in stream.close()]
    assert event["type"] == "response.completed" and event["response"]["usage"] is None
    assert event["response"]["output"][0]["content"][0]["text"] == "x"
