"""Hostile input on the real service: schemathesis over its OpenAPI schema, then hand-written
cases (deep nesting, invalid UTF-8, wrong types, huge headers, NaN...). Every refusal is a 4xx
in the OpenAI error shape; nothing is a 5xx, nothing hangs."""

from __future__ import annotations

import copy
import json
import socket
import time
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from deployments.ingress import app as ingress_app
from serve_app.sse import iter_data

pytestmark = pytest.mark.integration

CHAT_MODEL = "smollm2-135m-instruct"
BASE_MODEL = "gemma-3-270m"
EMBED_MODEL = "all-minilm-l6-v2"
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
MAX_FUZZ_TOKENS = 2  # fuzzed generations really run: keep each one to a couple of tokens
MAX_FUZZ_LIST_ITEMS = 8
MAX_EXAMPLES = 25  # per operation and phase; the whole schema run takes about two minutes
REQUEST_TIMEOUT_S = 120
ERROR_KEYS = {"message", "type", "param", "code"}


# ---- schemathesis over /openapi.json ---------------------------------------------------------


# The schema is built from the ingress's FastAPI app at import (no service needed to collect);
# test_served_schema_is_the_fuzzed_schema checks the running service serves exactly this one.
# (schemathesis.pytest.from_fixture, the lazy loader, fails on pytest 9: Node._nodeid is gone.)
SERVED_SCHEMA = ingress_app.openapi()
# The served schema says `model: string`; narrowed to the configured ids, positive cases reach
# validation, the engine and the stream (negative cases still send other strings: 404).
MODEL_IDS = {
    "ChatCompletionRequest": [CHAT_MODEL],
    "CompletionRequest": [CHAT_MODEL, BASE_MODEL],
    "EmbeddingRequest": [EMBED_MODEL],
    "ResponsesRequest": [CHAT_MODEL],
    "MessagesRequest": [CHAT_MODEL],
    "TokenizeRequest": [CHAT_MODEL, BASE_MODEL],
    "DetokenizeRequest": [CHAT_MODEL, BASE_MODEL],
    "RerankRequest": [EMBED_MODEL],
    "ScoreRequest": [EMBED_MODEL],
    "/v1/models/{model_id}": [CHAT_MODEL, BASE_MODEL, EMBED_MODEL],
    "/admin/models/{model_id}/stats": [CHAT_MODEL, BASE_MODEL],
}


def fuzzed_schema() -> dict[str, Any]:
    raw = copy.deepcopy(SERVED_SCHEMA)
    components = raw["components"]["schemas"]
    for name, ids in MODEL_IDS.items():
        if name in components:
            components[name]["properties"]["model"] = {"type": "string", "enum": ids}
        for parameter in raw["paths"].get(name, {}).get("get", {}).get("parameters", []):
            parameter["schema"] = {"type": "string", "enum": ids}
    return raw


# Adding, removing, loading and unloading models would change the service the other tests share;
# their validation and errors are tested in test_model_management.py.
schema = (
    schemathesis.openapi.from_dict(fuzzed_schema())
    .include(path_regex=r"^/(v1|admin|health|tokenize|detokenize)")
    .exclude(method=["POST", "DELETE"], path_regex=r"^/admin/models")
)


def test_served_schema_is_the_fuzzed_schema(service_url: str) -> None:
    assert httpx.get(f"{service_url}/openapi.json", timeout=30).json() == SERVED_SCHEMA


@schemathesis.check
def openai_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx from our app is JSON {"error": {message, type, param, code}}."""
    if response.status_code < 400:
        return None
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    return True


# The last event of a 200 stream: OpenAI's [DONE], or the translated APIs' closing events.
_LAST_EVENTS = {
    "/v1/responses": ("response.completed", "response.incomplete", "response.failed", "error"),
    "/v1/messages": ("message_stop", "error"),
}


@schemathesis.check
def stream_ends_with_done(ctx: Any, response: Any, case: Any) -> bool | None:
    """A 200 event stream always ends: `data: [DONE]`, or the API's own closing event."""
    if response.status_code != 200:
        return None
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return None
    events = list(iter_data(response.content.decode().splitlines()))
    assert events, "an empty stream"
    if case.path in _LAST_EVENTS:
        assert json.loads(events[-1])["type"] in _LAST_EVENTS[case.path], events[-3:]
    else:
        assert events[-1] == "[DONE]", events[-3:]
    return True


_TOKEN_LIMITS = {  # per generating route, the fields that cap its tokens (the default first)
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens",),
    "/v1/responses": ("max_output_tokens",),
    "/v1/messages": ("max_tokens",),
}


def bound_generation(case: Any) -> None:
    """Fuzzed bodies that are valid really generate: bound the tokens (only integers above the
    cap are lowered, so a negative case keeps its invalid value) and, in positive cases only,
    the prompt (1024 empty messages is valid but a minute of prefill on two busy cores; long
    prompts are the hand-written cases' and test_api's business)."""
    fields = _TOKEN_LIMITS.get(case.path)
    if fields is None or not isinstance(case.body, dict):
        return
    body = case.body
    for field in fields:
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_FUZZ_TOKENS:
            body[field] = MAX_FUZZ_TOKENS
    if case.path != "/v1/messages" and body.get(fields[0]) is None:
        # Missing or an explicit null: the model's default (1024 tokens) would outlast the
        # request timeout. (/v1/messages requires max_tokens: a missing one is the case.)
        body[fields[0]] = MAX_FUZZ_TOKENS
    if case.meta is not None and case.meta.generation.mode.is_positive:
        for field in ("messages", "prompt", "input"):
            if isinstance(body.get(field), list):
                body[field] = body[field][:MAX_FUZZ_LIST_ITEMS]


@pytest.mark.timeout(600)
@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_openapi_schema_fuzz(case: Any, service_url: str) -> None:
    bound_generation(case)
    response = case.call(base_url=service_url, timeout=REQUEST_TIMEOUT_S)
    case.validate_response(
        response,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            negative_data_rejection,
            openai_error_shape,
            stream_ends_with_done,
        ],
    )


# ---- hand-written hostile bodies -------------------------------------------------------------

CHAT_PATH, COMPLETIONS_PATH, EMBEDDINGS_PATH = GENERATION_PATHS + ("/v1/embeddings",)
RERANK_PATH, SCORE_PATH = "/v1/rerank", "/v1/score"
HI = [{"role": "user", "content": "hi"}]
VALID = {
    CHAT_PATH: {"model": CHAT_MODEL, "messages": HI, "max_tokens": 2},
    COMPLETIONS_PATH: {"model": CHAT_MODEL, "prompt": "Hello", "max_tokens": 2},
    EMBEDDINGS_PATH: {"model": EMBED_MODEL, "input": "Hello"},
    RERANK_PATH: {"model": EMBED_MODEL, "query": "Hello", "documents": ["Hi", "Bye"]},
    SCORE_PATH: {"model": EMBED_MODEL, "text_1": "Hello", "text_2": ["Hi", "Bye"]},
}
JSON_HEADERS = {"content-type": "application/json"}

# Values of the wrong JSON type (or an unsupported value) for every field each route accepts.
_STR = [1, 1.5, True, [], {}]
_BOOL = ["true", 1, 0, None, []]
_INT = ["5", 1.5, True, [], {}]
_FLOAT = ["1", True, [], {}]
_OBJECT = ["x", 1, True, []]
_SAMPLING = {
    "model": _STR + [None, ""],
    "stream": _BOOL,
    "stream_options": _OBJECT + [{"include_usage": "yes"}, {"other": True}],
    "max_tokens": _INT + [0, -1],
    "temperature": _FLOAT + [-0.1, 2.5],
    "top_p": _FLOAT + [0, 1.5],
    "top_k": _INT + [-1],
    "ignore_eos": _BOOL,
    "seed": _INT + [2**64],
    "stop": [1, True, {}, [1], ["a", "b", "c", "d", "e"], [""]],
    "presence_penalty": _FLOAT + [3],
    "frequency_penalty": _FLOAT + [-3],
    "n": _INT + [0, 9],
    # 50256 is past SmolLM2's 49152 tokens: refused by the replica, which knows the vocabulary.
    "logit_bias": _OBJECT + [{"1": "x"}, {"a": 1}, {"1": 101}, {"50256": -100}],
    "user": _STR,
    "response_format": _OBJECT + [{"type": "xml"}, {"type": "json_schema"}],
    "structured_outputs": _OBJECT + [{}, {"regex": "a", "choice": ["a"]}, {"regex": "("}],
}
WRONG_VALUES: dict[str, dict[str, list[Any]]] = {
    CHAT_PATH: {
        **_SAMPLING,
        "messages": ["hi", 1, {}, [], [1], ["hi"], [{"content": "x"}], [{"role": "robot"}]],
        "max_completion_tokens": _INT + [0],
        "logprobs": ["x", 1],
        "top_logprobs": ["x", True, 1, 21],  # 1 alone: top_logprobs needs logprobs
        "tools": ["x", 1, [{"type": "function"}], [{"type": "code_interpreter"}]],
        "tool_choice": [1, "auto", {"type": "function"}],  # "auto" without tools
        "parallel_tool_calls": _BOOL[:2] + [[]],
    },
    COMPLETIONS_PATH: {
        **_SAMPLING,
        "prompt": [1, True, {}, None, "", [], [1.5], [True], [[1], [2]], ["a", "b"], [-1]],
        "echo": ["x", 1],
        "logprobs": ["x", True, 6, -1],
        "best_of": ["x", True, 2],
        "suffix": [1, "x"],
    },
    EMBEDDINGS_PATH: {
        "model": _STR + [None, ""],
        "input": [1, True, {}, None, "", [], [1], [""], [None]],
        "encoding_format": [1, "hex", None],
        "dimensions": _INT + [0, 64],
        "user": _STR,
    },
    RERANK_PATH: {
        "model": _STR + [None, ""],
        "query": _STR + [None, "", ["Hello"]],
        "documents": ["Hi", 1, {}, None, [], [1], [""], [None], ["d"] * 1001],
        "top_n": _INT + [-1],
        "return_documents": _BOOL,
    },
    SCORE_PATH: {
        "model": _STR + [None, ""],
        "text_1": [1, True, {}, None, "", [], [1], [""], ["a"] * 1001],
        "text_2": [1, True, {}, None, "", [], [1], [""], ["b"] * 1001],
    },
}


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error: dict = body["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"]
    if param is not None:
        assert (error["param"] or "").split(".")[0] == param, (param, error)
    return error


def post_raw(url: str, content: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url, content=content, headers=headers or JSON_HEADERS, timeout=60)


def test_wrong_types_for_every_field_are_400_naming_it(service_url: str) -> None:
    from serve_app.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
    from serve_app.rerank_api import RerankRequest, ScoreRequest

    models = {
        CHAT_PATH: ChatCompletionRequest,
        COMPLETIONS_PATH: CompletionRequest,
        EMBEDDINGS_PATH: EmbeddingRequest,
        RERANK_PATH: RerankRequest,
        SCORE_PATH: ScoreRequest,
    }
    num_sent = 0
    with httpx.Client(base_url=service_url, timeout=60) as client:
        for path, wrong_values in WRONG_VALUES.items():
            assert set(wrong_values) == set(models[path].model_fields), path  # every field
            for field, values in wrong_values.items():
                for value in values:
                    response = client.post(path, json={**VALID[path], field: value})
                    assert_openai_error(response, 400, field)
                    num_sent += 1
    assert num_sent >= 300  # 349 today: 59 fields, 3-11 wrong values each


@pytest.mark.parametrize("path", [CHAT_PATH, COMPLETIONS_PATH, EMBEDDINGS_PATH])
def test_deep_nesting_is_400_invalid_json(service_url: str, path: str) -> None:
    depth = 10_000
    bodies = [
        b"[" * depth + b"]" * depth,
        b'{"a":' * depth + b"1" + b"}" * depth,
        b'{"model":"x","messages":' + b"[" * depth + b"]" * depth + b"}",
    ]
    for body in bodies:
        error = assert_openai_error(post_raw(f"{service_url}{path}", body), 400)
        assert error["code"] == "invalid_json" and "recursion" in error["message"]
    # Shallow enough for the JSON parser, deep for the validator: still a plain 400.
    nested = {**VALID[path], "user": json.loads("[" * 500 + "]" * 500)}
    assert_openai_error(httpx.post(f"{service_url}{path}", json=nested, timeout=60), 400, "user")


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"\xff\xfe","messages":[{"role":"user","content":"hi"}]}',
        b'{"model":"smollm2-135m-instruct","messages":[{"role":"user","content":"\xc3\x28"}]}',
        b"\x00\x01\x02\x03",
        b'{"model": "' + "é".encode("latin-1") + b'"}',
    ],
)
def test_invalid_utf8_is_400_invalid_json(service_url: str, body: bytes) -> None:
    error = assert_openai_error(post_raw(f"{service_url}{CHAT_PATH}", body), 400)
    assert error["code"] == "invalid_json"


def test_utf8_encoded_surrogate_is_400(service_url: str) -> None:
    # json.loads reads bytes with "surrogatepass": this becomes a lone surrogate in a str.
    body = b'{"model":"%s","messages":[{"role":"user","content":"\xed\xa0\x80"}]}' % (
        CHAT_MODEL.encode()
    )
    assert_openai_error(post_raw(f"{service_url}{CHAT_PATH}", body), 400, "messages")


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        (CHAT_PATH, "messages", [{"role": "user", "content": "a\ud800b"}]),
        (
            CHAT_PATH,
            "messages",
            [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}],
        ),
        (CHAT_PATH, "messages", [{"role": "user", "content": "hi", "name": "\ud83d"}]),
        (CHAT_PATH, "stop", ["\ud800"]),
        (CHAT_PATH, "user", "\udc00"),
        (COMPLETIONS_PATH, "prompt", "\ud800"),
        (COMPLETIONS_PATH, "prompt", ["\ud800"]),
        (EMBEDDINGS_PATH, "input", ["ok", "\ud800"]),
        (EMBEDDINGS_PATH, "model", "\ud800"),
        (RERANK_PATH, "documents", ["ok", "\ud800"]),
        (RERANK_PATH, "query", "\udc00"),
        (SCORE_PATH, "text_2", ["ok", "\ud800"]),
    ],
)
def test_lone_surrogates_are_400_not_a_failed_model(
    service_url: str, path: str, field: str, value: Any
) -> None:
    # json.dumps escapes them ("\ud800"): valid JSON, not valid Unicode. Was a 503 from the
    # tokenizer (TypeError) that blamed the model.
    body = json.dumps({**VALID[path], field: value}).encode()
    assert_openai_error(post_raw(f"{service_url}{path}", body), 400, field)


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"", "application/json"),
        (b"", None),
        (json.dumps(VALID[CHAT_PATH]).encode(), "text/plain"),
        (json.dumps(VALID[CHAT_PATH]).encode(), "application/x-www-form-urlencoded"),
        (b"model=x&messages=y", "application/x-www-form-urlencoded"),
        (
            b"--b\r\nContent-Disposition: form-data; name=model\r\n\r\nx\r\n--b--",
            "multipart/form-data; boundary=b",
        ),
        (json.dumps(VALID[CHAT_PATH]).encode(), "application/xml"),
        (b"[1, 2, 3]", "application/json"),
        (json.dumps([VALID[CHAT_PATH]]).encode(), "application/json"),
        (b'"a string"', "application/json"),
        (b"null", "application/json"),
        (b"42", "application/json"),
        (b"true", "application/json"),
        (b"{}", "application/json"),
        (b'{"model": "x", ', "application/json"),
        (b"1" * 5000, "application/json"),
        (b'{"max_tokens": ' + b"9" * 5000 + b"}", "application/json"),
    ],
)
def test_bodies_that_are_not_a_request_object_are_400(
    service_url: str, content: bytes, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    for path in (CHAT_PATH, COMPLETIONS_PATH, EMBEDDINGS_PATH, RERANK_PATH, SCORE_PATH):
        assert_openai_error(post_raw(f"{service_url}{path}", content, headers), 400)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"])
def test_nan_and_infinity_are_400(service_url: str, literal: bytes) -> None:
    fields = {
        CHAT_PATH: [
            "temperature",
            "top_p",
            "presence_penalty",
            "frequency_penalty",
            "max_tokens",
            "seed",
            "top_k",
        ],
        COMPLETIONS_PATH: ["temperature", "top_p", "max_tokens"],
        EMBEDDINGS_PATH: ["dimensions"],
        RERANK_PATH: ["top_n"],
    }
    for path, names in fields.items():
        for name in names:
            base = json.dumps({k: v for k, v in VALID[path].items() if k != name})
            body = base[:-1].encode() + b', "' + name.encode() + b'": ' + literal + b"}"
            assert_openai_error(post_raw(f"{service_url}{path}", body), 400, name)
    logit_bias = b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"logit_bias":{"1":%s}}'
    body = logit_bias % (CHAT_MODEL.encode(), literal)
    assert_openai_error(post_raw(f"{service_url}{CHAT_PATH}", body), 400, "logit_bias")


@pytest.mark.parametrize(
    "model",
    [
        "模型",
        "😀🔥",
        "smollm2-135m-instruct\u200b",
        "ｓｍｏｌｌｍ２",
        "\u202emodel",
        "a\u0000b",
        "smollm2-135m-instruct\n",
        " smollm2-135m-instruct",
        "../../etc/passwd",
        "x" * 100_000,
    ],
)
def test_unicode_or_huge_model_names_are_404(service_url: str, model: str) -> None:
    for path, body in VALID.items():
        response = httpx.post(f"{service_url}{path}", json={**body, "model": model}, timeout=60)
        assert assert_openai_error(response, 404, "model")["code"] == "model_not_found"
    if len(model) < 1000 and model.isprintable():
        for path in (f"/v1/models/{model}", f"/admin/models/{model}/stats"):
            response = httpx.get(f"{service_url}{path}", timeout=60)
            assert_openai_error(response, 404)


def test_model_name_past_the_url_limit_is_refused_by_the_http_server(service_url: str) -> None:
    # uvicorn (httptools), in the ingress replica behind HAProxy (or in Serve's proxy without
    # it), refuses a request line over 64 KiB itself: plain text.
    status, headers, _ = raw_request(service_url, b"GET /v1/models/" + b"x" * 70_000)
    assert status == 400 and headers.get("content-type", "").startswith("text/plain")


def test_tiny_temperature_is_greedy_and_spares_the_batch(service_url: str) -> None:
    """temperature=1e-300 once overflowed logits to inf, failed the engine step and with it
    every request in the batch (500 here, error events in others' streams)."""
    body = {"model": CHAT_MODEL, "messages": HI, "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{service_url}{CHAT_PATH}", json=body, timeout=120) as other:
        stream = iter_data(other.iter_lines())
        assert next(stream)  # the first token is out
        for temperature in (1e-300, 5e-324, 1e-45):
            for path in (CHAT_PATH, COMPLETIONS_PATH):
                tiny = {**VALID[path], "temperature": temperature}
                response = httpx.post(f"{service_url}{path}", json=tiny, timeout=120)
                assert response.status_code == 200, response.text
        events = list(stream)
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
    assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")


# ---- hand-written hostile HTTP ---------------------------------------------------------------


def raw_request(
    url: str, request_line: bytes, headers: bytes = b"", body: bytes = b"", timeout_s: float = 60
) -> tuple[int, dict[str, str], bytes]:
    """One request over a plain socket (httpx refuses to send what these tests need)."""
    host, port = url.removeprefix("http://").split(":")
    head = request_line + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n"
    if body:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(head + headers + b"\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    parsed = dict(line.lower().split(": ", 1) for line in header_lines if ": " in line)
    return int(status_line.split()[1]), parsed, payload


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"a" * 65_536 + b"\r\n",
        b"Authorization: Bearer " + b"a" * 65_536 + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(2000)),
        b"Authorization: Bearer \xff\xfe\x80\r\n",
        b"Content-Type: application/json; charset=\xff\r\n",
    ],
    ids=["64KiB-header", "64KiB-bearer", "2000-headers", "latin1-bearer", "bad-charset"],
)
def test_hostile_headers_never_5xx_nor_hang(service_url: str, headers: bytes) -> None:
    start = time.monotonic()
    body = json.dumps(VALID[EMBEDDINGS_PATH]).encode()
    status, _, _ = raw_request(service_url, b"POST /v1/embeddings", headers, body)
    assert status < 500 and time.monotonic() - start < 30


def test_oversized_headers_are_refused_with_431(service_url: str) -> None:
    # HAProxy (128 KiB buffer) and Serve's proxy both forward these; the ingress refuses them.
    body = json.dumps(VALID[EMBEDDINGS_PATH]).encode()
    big = b"X-Big: " + b"a" * 65_536 + b"\r\n"
    status, _, reply = raw_request(service_url, b"POST /v1/embeddings", big, body)
    assert status == 431
    assert json.loads(reply)["error"]["code"] == "headers_too_large"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 64,  # a TLS hello
    ],
    ids=["negative-length", "garbage-length", "nul-in-header", "tls-hello"],
)
def test_malformed_http_is_refused_by_the_http_server(
    service_url: str, request_bytes: bytes
) -> None:
    host, port = service_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request_bytes)
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400 ")  # the front's own 400 (HAProxy), before our app
