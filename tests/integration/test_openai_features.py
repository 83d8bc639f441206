"""What agents send, through the real service and SmolLM2: structured outputs, tools (named,
required, streamed, a round trip), logprobs, n, logit_bias, echo; and LangChain's client."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

pytestmark = pytest.mark.integration

CHAT_MODEL = "smollm2-135m-instruct"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 30}},
            "required": ["timezone"],
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
# The schema bounds no number's length: a vaguer prompt let SmolLM2 repeat digits to max_tokens.
PARIS_AS_JSON = {
    "role": "user",
    "content": "Describe Paris as a JSON object with name, country and population.",
}


@pytest.fixture(scope="module")
def client(service_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service_url}/v1", api_key="unused", max_retries=0, timeout=120)


def assert_valid_call(call: Any, tools: list[dict[str, Any]]) -> None:
    tool = next(t for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    assert call.id.startswith("call_") and call.type == "function"


# ---- structured outputs ------------------------------------------------------------------


class City(BaseModel):
    name: str
    country: str
    population: int


def test_parse_with_a_pydantic_model_gives_a_valid_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=CHAT_MODEL,
        messages=[PARIS_AS_JSON],
        response_format=City,
        max_tokens=100,
        temperature=0,
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop", message.content
    assert isinstance(message.parsed, City) and message.parsed.name


def test_json_object_and_vllm_structured_outputs(client: openai.OpenAI) -> None:
    as_json = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
        response_format={"type": "json_object"},
        max_tokens=80,
        temperature=0,
    )
    if as_json.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(as_json.choices[0].message.content or ""), dict)
    choice = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Is Paris in France?"}],
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
        max_tokens=5,
    )
    assert choice.choices[0].message.content in ("yes", "no")
    regex = client.completions.create(
        model=CHAT_MODEL,
        prompt="A phone number: ",
        extra_body={"structured_outputs": {"regex": "[0-9]{3}-[0-9]{4}"}},
        max_tokens=20,
    )
    assert len(regex.choices[0].text) == 8 and regex.choices[0].text[3] == "-"


# ---- tools -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_time"}}],
    ids=["required", "named"],
)
def test_required_and_named_calls_have_arguments_that_validate(
    client: openai.OpenAI, tool_choice: Any
) -> None:
    tools = [WEATHER_TOOL, TIME_TOOL]
    completion = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ASK_WEATHER,
        tools=tools,
        tool_choice=tool_choice,
        max_tokens=120,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert_valid_call(call, tools)
    if isinstance(tool_choice, dict):
        assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]


def test_a_streamed_call_reassembles_from_its_deltas(client: openai.OpenAI) -> None:
    tools = [WEATHER_TOOL]
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ASK_WEATHER,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,  # one call (SmolLM2 may repeat calls up to max_tokens)
        max_tokens=120,
        temperature=0,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    num_argument_deltas, finish_reason = 0, None
    for chunk in stream:
        choice = chunk.choices[0]
        assert not choice.delta.content  # no raw markup as content
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            if delta.id:
                assert not call["id"] and not call["arguments"]  # id and name come first
                call["id"], call["name"] = delta.id, delta.function.name or ""
            if delta.function and delta.function.arguments:
                call["arguments"] += delta.function.arguments
                num_argument_deltas += 1
        finish_reason = choice.finish_reason or finish_reason
    assert finish_reason == "tool_calls" and calls and num_argument_deltas > 1
    for call in calls.values():
        assert call["name"] == "get_weather" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), WEATHER_TOOL["function"]["parameters"])


def test_a_tool_round_trip_ends_with_an_answer(client: openai.OpenAI) -> None:
    tools = [WEATHER_TOOL]
    first = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=ASK_WEATHER,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,  # one call to answer (SmolLM2 may repeat calls otherwise)
        max_tokens=120,
        temperature=0,
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    history: list[Any] = [
        *ASK_WEATHER,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees celsius, sunny"},
    ]
    final = client.chat.completions.create(
        model=CHAT_MODEL, messages=history, tools=tools, max_tokens=60, temperature=0
    )
    choice = final.choices[0]
    if choice.message.tool_calls:  # auto: the model may call again; then it must be valid
        for again in choice.message.tool_calls:
            assert_valid_call(again, tools)
    else:
        assert choice.message.content and not choice.message.content.startswith('{"')
    plain = client.chat.completions.create(
        model=CHAT_MODEL, messages=history, tools=tools, tool_choice="none", max_tokens=30
    )
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls


# ---- logprobs, n, logit_bias, echo -------------------------------------------------------


def test_logprobs_are_negative_sorted_and_spell_the_content(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        logprobs=True,
        top_logprobs=3,
        max_tokens=8,
        temperature=0,
    )
    choice = completion.choices[0]
    entries = choice.logprobs.content  # type: ignore[union-attr]
    assert entries and len(entries) == completion.usage.completion_tokens  # type: ignore[union-attr]
    for entry in entries:
        tops = [top.logprob for top in entry.top_logprobs]
        assert entry.logprob <= 0 and len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.token == entry.top_logprobs[0].token  # greedy picks the most likely
    spelled = "".join(entry.token for entry in entries)
    assert spelled.startswith(choice.message.content or "")


def test_n_choices_decode_on_their_own(client: openai.OpenAI) -> None:
    def create() -> Any:
        return client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "Write a word."}],
            n=2,
            max_tokens=12,
            temperature=1.0,
            seed=11,
        )

    # Same seed, same text holds for a request that meets the same prefix cache: a first
    # request prefills its whole prompt, a repeat only what the cache lacks, and at bf16
    # activations (native weights) that split changes logits by ~0.25 (docs/benchmarks.md).
    create()
    completion = create()
    assert [c.index for c in completion.choices] == [0, 1]
    assert all(c.message.content for c in completion.choices)
    # Each choice has its own seeded stream (seed + i), not one shared draw.
    assert completion.choices[0].message.content != completion.choices[1].message.content
    assert completion.usage.completion_tokens >= 2  # type: ignore[union-attr]
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Write a word."}],
        n=2,
        max_tokens=12,
        temperature=1.0,
        seed=11,
        stream=True,
    )
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {i: c.message.content for i, c in enumerate(completion.choices)}


def test_logit_bias_bans_the_greedy_token(client: openai.OpenAI, service_url: str) -> None:
    prompt = "The capital of France is"

    def first_token(**extra: Any) -> str:
        completion = client.completions.create(
            model=CHAT_MODEL, prompt=prompt, max_tokens=1, temperature=0, **extra
        )
        return completion.choices[0].text

    greedy = first_token()
    [banned_id] = tokenize(service_url, {"prompt": greedy, "add_special_tokens": False})
    other = first_token(logit_bias={str(banned_id): -100})
    assert other and other != greedy


def tokenize(service_url: str, body: dict[str, Any]) -> list[int]:
    response = httpx.post(f"{service_url}/tokenize", json={"model": CHAT_MODEL, **body}, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["count"] == len(result["tokens"]) and result["max_model_len"] == 8192
    return list(result["tokens"])


def test_tokenize_and_detokenize_round_trip(client: openai.OpenAI, service_url: str) -> None:
    text = "Paris is lovely in spring. Ünïcödé 🙂"
    ids = tokenize(service_url, {"prompt": text, "add_special_tokens": False})
    response = httpx.post(
        f"{service_url}/detokenize", json={"model": CHAT_MODEL, "tokens": ids}, timeout=60
    )
    assert response.status_code == 200 and response.json() == {"prompt": text}
    chat_ids = tokenize(service_url, {"messages": [{"role": "user", "content": "Hi"}]})
    usage = client.chat.completions.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1
    ).usage
    assert usage is not None and len(chat_ids) == usage.prompt_tokens
    bad = httpx.post(
        f"{service_url}/detokenize", json={"model": CHAT_MODEL, "tokens": [10**9]}, timeout=60
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_echo_returns_the_prompt_before_the_answer(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    completion = client.completions.create(
        model=CHAT_MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True
    )
    plain = client.completions.create(model=CHAT_MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert completion.choices[0].text == prompt + plain.choices[0].text


# ---- an agent framework's own client -----------------------------------------------------


def test_langchain_bind_tools_and_with_structured_output(service_url: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=CHAT_MODEL,
        base_url=f"{service_url}/v1",
        api_key="unused",  # type: ignore[arg-type]
        temperature=0,
        max_completion_tokens=120,
        max_retries=0,
    )
    message = llm.bind_tools([WEATHER_TOOL], tool_choice="get_weather").invoke(
        "What is the weather in Paris?"
    )
    [call] = message.tool_calls  # type: ignore[attr-defined]
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], WEATHER_TOOL["function"]["parameters"])
    city = llm.with_structured_output(City, method="json_schema").invoke(PARIS_AS_JSON["content"])
    assert isinstance(city, City) and city.name
