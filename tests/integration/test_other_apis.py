"""The Responses API and Anthropic's Messages API through their own SDKs, against the real
service and SmolLM2 (both answered through the chat path)."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.integration

CHAT_MODEL = "smollm2-135m-instruct"
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def client(service_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(service_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=service_url, api_key="unused", max_retries=0, timeout=120)


def test_responses_create_answers_with_output_text(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=CHAT_MODEL,
        instructions="Answer in one short sentence.",
        input="What is the capital of France?",
        max_output_tokens=30,
        temperature=0,
    )
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.usage is not None and response.usage.output_tokens > 0
    assert response.id.startswith("resp_")


def test_responses_stream_ends_with_the_completed_response(client: openai.OpenAI) -> None:
    deltas, final = [], None
    for event in client.responses.create(
        model=CHAT_MODEL, input="Say hello.", max_output_tokens=12, temperature=0, stream=True
    ):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert final is not None and len(deltas) > 1 and final.output_text == "".join(deltas)


def test_responses_function_call_and_json_schema(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=CHAT_MODEL,
        input="What is the weather in Paris?",
        tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMETERS}],
        tool_choice="required",
        temperature=0,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and all(call.name == "get_weather" for call in calls)  # parallel calls allowed
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMETERS)
    structured = client.responses.create(
        model=CHAT_MODEL,
        input="Describe Paris as a JSON object with its name.",
        text={"format": {"type": "json_schema", "name": "city", "schema": WEATHER_PARAMETERS}},
        temperature=0,
        max_output_tokens=40,
    )
    jsonschema.validate(json.loads(structured.output_text), WEATHER_PARAMETERS)


def test_messages_create_and_stream(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=CHAT_MODEL,
        max_tokens=24,
        system="Answer briefly.",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        extra_body={"temperature": 0},  # the SDK (2.x) has no temperature argument
    )
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens > 0
    with claude.messages.stream(
        model=CHAT_MODEL,
        max_tokens=24,
        system="Answer briefly.",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        extra_body={"temperature": 0},  # the SDK (2.x) has no temperature argument
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == final.content[0].text == message.content[0].text  # type: ignore[union-attr]


def test_messages_tool_use(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=CHAT_MODEL,
        max_tokens=80,
        tools=[
            {"name": "get_weather", "description": "Weather", "input_schema": WEATHER_PARAMETERS}
        ],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        extra_body={"temperature": 0},  # the SDK (2.x) has no temperature argument
    )
    blocks = [b for b in message.content if b.type == "tool_use"]
    assert message.stop_reason == "tool_use" and blocks
    for block in blocks:
        assert block.name == "get_weather"
        jsonschema.validate(block.input, WEATHER_PARAMETERS)


def test_other_apis_refuse_what_they_cannot_do(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=CHAT_MODEL, input="hi", previous_response_id="resp_x")
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-model", input="hi")
