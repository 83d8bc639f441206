"""The generic tool-call format: schema, prompt rendering, and the streaming parser; then the
tiny model constrained by the schema returns calls whose arguments validate."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from serve_app.engine.llm_engine import LLMEngine
from serve_app.engine.types import Constraint, SamplingParams
from serve_app.tool_calls import ToolChoice, ToolOutputParser, output_schema, render_messages
from tests.unit.test_engine import prompt_ids

WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 10},
            "unit": {"enum": ["c", "f"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {}}}


def stream(parser: ToolOutputParser, text: str, seed: int) -> tuple[str, dict[int, str], list]:
    """Feeds text in random pieces; returns the content, the arguments per call, the calls."""
    rng = random.Random(seed)
    content, arguments, calls = "", {}, []
    position = 0
    while position < len(text):
        size = rng.randint(1, 7)
        delta = parser.feed(text[position : position + size])
        position += size
        content += delta.content
        calls.extend(delta.new_calls)
        for index, fragment in delta.arguments:
            arguments[index] = arguments.get(index, "") + fragment
    return content, arguments, calls


@pytest.mark.parametrize("seed", range(5))
def test_streamed_calls_arrive_name_first_then_their_exact_arguments(seed: int) -> None:
    answer = {
        "tool_calls": [
            {"name": "get_weather", "arguments": {"city": 'Pa"r{is}', "unit": "c"}},
            {"name": "get_time", "arguments": {}},
        ]
    }
    parser = ToolOutputParser()
    content, arguments, calls = stream(parser, json.dumps(answer), seed)
    assert content == "" and parser.content is None
    assert [call.name for call in calls] == ["get_weather", "get_time"]
    assert len({call.id for call in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    for index, call in enumerate(answer["tool_calls"]):
        assert arguments[index] == json.dumps(call["arguments"])
    assert [c.arguments for c in parser.complete_calls] == [arguments[0], arguments[1]]


@pytest.mark.parametrize("seed", range(5))
def test_a_direct_answer_streams_as_decoded_content(seed: int) -> None:
    text = 'Line one\nsays "hi" \\ and \u00e9\u4e16 \U0001f642 done'
    parser = ToolOutputParser()
    content, arguments, calls = stream(parser, json.dumps({"response": text}), seed)
    assert content == text == parser.content and not arguments and not calls


def test_the_schema_admits_only_the_offered_calls() -> None:
    auto = output_schema(ToolChoice([WEATHER, TIME], "auto"))
    good = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome", "unit": "f"}}]}
    jsonschema.validate(good, auto)
    jsonschema.validate({"response": "hello"}, auto)
    for bad in [
        {"tool_calls": [{"name": "nope", "arguments": {}}]},
        {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]},
        {"tool_calls": []},
    ]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, auto)
    required = output_schema(ToolChoice([WEATHER, TIME], "required", is_parallel=False))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"response": "hello"}, required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_calls": [good["tool_calls"][0]] * 2}, required)


def test_arguments_hold_only_the_declared_keys_unless_the_schema_opens_them() -> None:
    open_tool = {
        "name": "find",
        "parameters": {
            "type": "object",
            "properties": {
                "place": {"type": "object", "properties": {"city": {"type": "string"}}},
                "tags": {"type": "array", "items": {"properties": {"k": {"type": "string"}}}},
                "extra": {"type": "object", "additionalProperties": {"type": "integer"}},
                "free": {"type": "object"},
            },
        },
    }
    schema = output_schema(ToolChoice([open_tool], "required"))

    def call(arguments: dict) -> dict:
        return {"tool_calls": [{"name": "find", "arguments": arguments}]}

    jsonschema.validate(
        call({"place": {"city": "Rome"}, "extra": {"n": 1}, "free": {"a": 1}}), schema
    )
    for stray in [
        {"zone": "x"},
        {"place": {"city": "Rome", "zone": "x"}},
        {"tags": [{"k": "a", "v": "b"}]},
        {"extra": {"n": "not an integer"}},
    ]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(call(stray), schema)
    assert "additionalProperties" not in open_tool["parameters"]  # the request is not mutated


def test_history_renders_in_plain_roles() -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
        {"role": "user", "content": "Thanks. And now?"},
    ]
    rendered = render_messages(messages, ToolChoice([WEATHER], "auto"))
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert "get_weather" in rendered[0]["content"]
    assert json.loads(rendered[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    }
    assert "call_1" in rendered[3]["content"] and "21 C" in rendered[3]["content"]
    assert rendered[3]["content"].endswith("Thanks. And now?")


@pytest.mark.parametrize("mode", ["required", "named"])
async def test_the_tiny_model_under_the_schema_returns_valid_calls(
    engine: LLMEngine, mode: str
) -> None:
    tools = [WEATHER] if mode == "named" else [WEATHER, TIME]
    schema = output_schema(ToolChoice(tools, mode))  # type: ignore[arg-type]
    params = SamplingParams(
        temperature=1.0,
        seed=7,
        max_tokens=120,
        constraint=Constraint("json_schema", json.dumps(schema)),
    )
    parser = ToolOutputParser()
    async for output in engine.generate("tools", prompt_ids(engine, "Weather?"), params):
        parser.feed(output.text)
    assert output.finish_reason == "stop", parser.text
    calls = parser.complete_calls
    assert calls and all(c.name in {t["name"] for t in tools} for c in calls)
    for call in calls:
        tool = next(t for t in tools if t["name"] == call.name)
        jsonschema.validate(json.loads(call.arguments), tool["parameters"])
