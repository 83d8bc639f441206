"""The real service (Ray Serve + bundled models) through the official openai client and raw SSE."""

from __future__ import annotations

import json
import math
import time

import httpx
import openai
import pytest

from serve_app.sse import iter_data

pytestmark = pytest.mark.integration

CHAT_MODEL = "smollm2-135m-instruct"
BASE_MODEL = "gemma-3-270m"
EMBED_MODEL = "all-minilm-l6-v2"
PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(service_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service_url}/v1", api_key="unused", max_retries=0, timeout=120)


# ---- models and health -------------------------------------------------------------------


def test_health_is_ok_when_all_models_are_ready(service_url: str) -> None:
    response = httpx.get(f"{service_url}/health")
    assert response.status_code == 200, response.text


def test_models_lists_every_model_with_kind_and_context(client: openai.OpenAI) -> None:
    models = {m.id: m.model_dump() for m in client.models.list().data}
    assert set(models) == {CHAT_MODEL, BASE_MODEL, EMBED_MODEL}
    assert models[CHAT_MODEL]["kind"] == "chat" and models[CHAT_MODEL]["context_length"] == 8192
    assert models[BASE_MODEL]["kind"] == "completion"
    assert models[EMBED_MODEL]["kind"] == "embedding" and models[EMBED_MODEL]["context_length"]
    assert client.models.retrieve(BASE_MODEL).id == BASE_MODEL


# ---- chat --------------------------------------------------------------------------------


def test_chat_answers_paris(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=CHAT_MODEL, messages=PARIS, temperature=0)
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage and reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_non_streamed_greedy(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    full = client.chat.completions.create(
        model=CHAT_MODEL, messages=messages, temperature=0, max_tokens=40
    )
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=messages,
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens  # type: ignore[union-attr]
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 5  # token by token, not one blob


def test_sse_wire_format_and_headers(service_url: str) -> None:
    body = {
        "model": CHAT_MODEL,
        "messages": PARIS,
        "temperature": 0,
        "stream": True,
        "max_tokens": 12,
    }
    with httpx.stream(
        "POST", f"{service_url}/v1/chat/completions", json=body, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-request-id"]
        arrivals = []
        events = []
        for data in iter_data(response.iter_lines()):
            events.append(data)
            arrivals.append(time.monotonic())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["id"] == chunks[0]["id"] for c in chunks)
    # Tokens arrive as they are made, spread over time, not all in one write at the end.
    assert arrivals[-2] - arrivals[1] > 0.05


def test_stop_strings_and_length(client: openai.OpenAI) -> None:
    full = (
        client.chat.completions.create(model=CHAT_MODEL, messages=PARIS, temperature=0)
        .choices[0]
        .message.content
        or ""
    )
    stop = "Paris"
    cut = client.chat.completions.create(
        model=CHAT_MODEL, messages=PARIS, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(
        model=CHAT_MODEL, messages=PARIS, temperature=0, max_tokens=3
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3  # type: ignore[union-attr]


def test_ignore_eos_generates_past_the_natural_end(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=CHAT_MODEL, messages=PARIS, temperature=0)
    assert full.choices[0].finish_reason == "stop" and full.usage  # ended by EOS
    num_tokens = full.usage.completion_tokens + 5
    longer = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=PARIS,
        temperature=0,
        max_tokens=num_tokens,
        extra_body={"ignore_eos": True},  # vLLM's extension, as the openai SDK sends it
    )
    assert longer.choices[0].finish_reason == "length"
    assert longer.usage and longer.usage.completion_tokens == num_tokens
    full_text = full.choices[0].message.content or ""
    assert (longer.choices[0].message.content or "").startswith(full_text)


def test_long_prompt_is_prefilled_in_chunks_and_answered(client: openai.OpenAI) -> None:
    """A prompt of several max_prefill_tokens budgets (256 by default) is prefilled over several
    engine iterations; the reply still answers the question at its end."""
    notes = " ".join(
        f"Note {i}: the meeting room on floor {i % 7} has {i % 5 + 2} chairs." for i in range(40)
    )
    question = f"{notes}\n\nForget the notes above. What is the capital of France?"
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=40,
    )
    assert reply.usage and reply.usage.prompt_tokens > 2 * 256
    assert "Paris" in (reply.choices[0].message.content or "")


def test_a_resent_conversation_is_prefilled_from_the_prefix_cache(
    client: openai.OpenAI, service_url: str
) -> None:
    """config/serve.yaml gives SmolLM2 a prefix cache: a chat's next turn resends the earlier
    turns, and their keys/values come from the cache."""
    notes = " ".join(f"Fact {i}: shelf {i} holds {i % 9 + 1} red boxes." for i in range(30))
    first = [{"role": "user", "content": f"{notes}\nHow many boxes are on shelf 4?"}]
    answer = client.chat.completions.create(
        model=CHAT_MODEL, messages=first, temperature=0, max_tokens=12
    )
    next_turn = [
        *first,
        {"role": "assistant", "content": answer.choices[0].message.content or ""},
        {"role": "user", "content": "And on shelf 5?"},
    ]
    before = stats(service_url)["num_cached_prompt_tokens"]
    cached = client.chat.completions.create(
        model=CHAT_MODEL, messages=next_turn, temperature=0, max_tokens=12
    )
    reused = stats(service_url)["num_cached_prompt_tokens"] - before
    assert answer.usage and reused >= answer.usage.prompt_tokens - 16  # the whole first turn
    # ...and the response says so, as OpenAI's usage does (read by the official client).
    assert cached.usage and cached.usage.prompt_tokens_details
    assert cached.usage.prompt_tokens_details.cached_tokens == reused
    assert cached.choices[0].message.content and cached.choices[0].finish_reason in (
        "stop",
        "length",
    )
    # That the cached keys give the same text as computing them is checked against
    # transformers' generate() in tests/unit/test_prefix_cache.py.


def test_seed_reproducible_through_the_api(client: openai.OpenAI) -> None:
    ask = dict(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Tell me a story."}],
        temperature=1.0,
        max_tokens=24,
    )
    # Sent once first, so a and b meet the same prefix cache (their prompt's cached part and
    # prefilled rest split alike): README's promise for `seed` (docs/benchmarks.md, "n=2,
    # seed=11": another split changes bf16 roundings, and so can change a sampled token).
    client.chat.completions.create(seed=1, **ask)  # type: ignore[call-overload]
    a = client.chat.completions.create(seed=42, **ask).choices[0].message.content  # type: ignore[call-overload]
    b = client.chat.completions.create(seed=42, **ask).choices[0].message.content  # type: ignore[call-overload]
    assert a == b


# ---- completions ---------------------------------------------------------------------------


def test_completions_on_base_model_stream_and_not(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    full = client.completions.create(model=BASE_MODEL, prompt=prompt, temperature=0, max_tokens=16)
    assert full.object == "text_completion" and full.choices[0].text
    chunks = list(
        client.completions.create(
            model=BASE_MODEL, prompt=prompt, temperature=0, max_tokens=16, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_completions_on_chat_model(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=CHAT_MODEL, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert reply.choices[0].text and reply.usage.completion_tokens <= 8  # type: ignore[union-attr]


def test_routing_by_model_gives_each_models_own_answer(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    a = client.completions.create(model=CHAT_MODEL, prompt=prompt, temperature=0, max_tokens=12)
    b = client.completions.create(model=BASE_MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert a.model == CHAT_MODEL and b.model == BASE_MODEL
    assert a.choices[0].text != b.choices[0].text


# ---- embeddings ----------------------------------------------------------------------------


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


def test_embeddings_dimensions_and_paraphrase_similarity(client: openai.OpenAI) -> None:
    texts = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
    ]
    result = client.embeddings.create(model=EMBED_MODEL, input=texts)
    vectors = [d.embedding for d in result.data]
    assert [d.index for d in result.data] == [0, 1, 2]
    assert all(len(v) == 384 for v in vectors)
    assert abs(math.sqrt(sum(x * x for x in vectors[0])) - 1.0) < 1e-3
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.2
    assert result.usage.prompt_tokens > 0


# ---- errors ------------------------------------------------------------------------------


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=PARIS)
    assert info.value.body["param"] == "model"  # type: ignore[index]


def test_invalid_parameter_is_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=PARIS, temperature=7)
    assert info.value.body["param"] == "temperature"  # type: ignore[index]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 9}, "n"),
        ({"stream": False, "tools": [], "tool_choice": "required"}, "tool_choice"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 7}}}},
            "response_format",
        ),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"not_an_openai_field": 1}, "not_an_openai_field"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ],
)
def test_unsupported_or_invalid_fields_are_rejected(
    service_url: str, extra: dict, param: str
) -> None:
    body = {"model": CHAT_MODEL, "messages": PARIS, **extra}
    assert_openai_error(httpx.post(f"{service_url}/v1/chat/completions", json=body), 400, param)


def test_context_overflow_is_400_stating_the_limit(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT_MODEL, messages=PARIS, max_tokens=9000)
    assert "8192" in info.value.message
    assert info.value.code == "context_length_exceeded"


def test_malformed_json_is_400(service_url: str) -> None:
    response = httpx.post(
        f"{service_url}/v1/chat/completions",
        content=b'{"model": "x", ',
        headers={"content-type": "application/json"},
    )
    assert_openai_error(response, 400)


def test_chat_to_base_model_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=BASE_MODEL, messages=PARIS)
    assert "/v1/completions" in info.value.message


def test_wrong_endpoint_for_model_kind(service_url: str) -> None:
    response = httpx.post(f"{service_url}/v1/embeddings", json={"model": CHAT_MODEL, "input": "x"})
    assert_openai_error(response, 400, "model")
    response = httpx.post(
        f"{service_url}/v1/completions", json={"model": EMBED_MODEL, "prompt": "x"}
    )
    assert_openai_error(response, 400, "model")


def test_unknown_route_is_404_json(service_url: str) -> None:
    assert_openai_error(httpx.get(f"{service_url}/v1/nothing-here"), 404)


# ---- cancellation --------------------------------------------------------------------------


def stats(service_url: str) -> dict:
    return httpx.get(f"{service_url}/admin/models/{CHAT_MODEL}/stats").json()


def test_client_disconnect_aborts_generation(service_url: str) -> None:
    before = stats(service_url)["num_aborted"]
    body = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": 1000,
        "ignore_eos": True,  # still running when the client leaves
        "stream": True,
    }
    with httpx.stream(
        "POST", f"{service_url}/v1/chat/completions", json=body, timeout=60
    ) as response:
        request_id = response.headers["x-request-id"]
        for i, _ in enumerate(response.iter_lines()):
            if i > 6:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        current = stats(service_url)
        if current["num_aborted"] > before and request_id not in current["running_ids"]:
            break
        time.sleep(0.1)
    assert current["num_aborted"] > before
    assert request_id not in current["running_ids"]
