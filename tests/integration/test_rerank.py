"""POST /v1/rerank and /v1/score against the real service: all-MiniLM-L6-v2's cosine similarity,
in vLLM's (Cohere/Jina) shapes, and their errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

EMBED_MODEL = "all-minilm-l6-v2"
CHAT_MODEL = "smollm2-135m-instruct"
QUERY = "What is the capital of France?"
DOCUMENTS = ["Bananas are yellow.", "Paris is the capital of France.", "The stock market fell."]
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def client(service_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service_url, timeout=120) as http:
        yield http


def post_ok(client: httpx.Client, path: str, **fields: Any) -> dict[str, Any]:
    response = client.post(path, json={"model": EMBED_MODEL, **fields})
    assert response.status_code == 200, response.text[:300]
    body: dict[str, Any] = response.json()
    return body


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error: dict[str, Any] = body["error"]
    return error


def test_rerank_puts_the_relevant_document_first(client: httpx.Client) -> None:
    body = post_ok(client, "/v1/rerank", query=QUERY, documents=DOCUMENTS)
    assert set(body) == {"id", "model", "usage", "results"} and body["model"] == EMBED_MODEL
    results = body["results"]
    assert [r["index"] for r in results][0] == 1
    assert results[0]["document"] == {"text": DOCUMENTS[1]}
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and sorted(r["index"] for r in results) == [
        0,
        1,
        2,
    ]
    assert scores[0] > 0.5 > scores[1] and all(-1.0 <= s <= 1.0 for s in scores)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > len(DOCUMENTS) + 1


def test_rerank_top_n_and_return_documents(client: httpx.Client) -> None:
    full = post_ok(client, "/v1/rerank", query=QUERY, documents=DOCUMENTS)["results"]
    top = post_ok(client, "/v1/rerank", query=QUERY, documents=DOCUMENTS, top_n=2)["results"]
    assert [r["index"] for r in top] == [r["index"] for r in full[:2]]
    bare = post_ok(client, "/rerank", query=QUERY, documents=DOCUMENTS, return_documents=False)
    assert all(set(r) == {"index", "relevance_score"} for r in bare["results"])
    assert [r["relevance_score"] for r in bare["results"]] == pytest.approx(
        [r["relevance_score"] for r in full], abs=1e-5
    )


def test_score_one_to_many_matches_rerank(client: httpx.Client) -> None:
    body = post_ok(client, "/v1/score", text_1=QUERY, text_2=DOCUMENTS)
    assert body["object"] == "list" and body["model"] == EMBED_MODEL
    assert isinstance(body["created"], int) and body["id"].startswith("score-")
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(d["object"] == "score" for d in body["data"])
    reranked = post_ok(client, "/v1/rerank", query=QUERY, documents=DOCUMENTS)["results"]
    by_index = {r["index"]: r["relevance_score"] for r in reranked}
    assert [d["score"] for d in body["data"]] == pytest.approx(
        [by_index[i] for i in range(3)], abs=1e-5
    )
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > 0


def test_score_one_to_one_and_n_to_n(client: httpx.Client) -> None:
    same = post_ok(client, "/score", text_1="A cat sat on the mat.", text_2="A cat sat on the mat.")
    assert len(same["data"]) == 1 and same["data"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    pairs = post_ok(
        client,
        "/v1/score",
        text_1=[QUERY, "Which fruit is yellow?"],
        text_2=["Paris is the capital of France.", "The stock market fell."],
    )
    first, second = (d["score"] for d in pairs["data"])
    assert first > 0.5 > second


def test_a_chat_model_cannot_rerank_or_score(client: httpx.Client) -> None:
    for path, fields in [
        ("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS}),
        ("/v1/score", {"text_1": QUERY, "text_2": DOCUMENTS}),
    ]:
        error = error_of(client.post(path, json={"model": CHAT_MODEL, **fields}), 400)
        assert error["param"] == "model" and CHAT_MODEL in error["message"]


def test_unknown_model_is_404(client: httpx.Client) -> None:
    body = {"model": "no-such-model", "query": QUERY, "documents": DOCUMENTS}
    assert error_of(client.post("/v1/rerank", json=body), 404)["code"] == "model_not_found"
    body = {"model": "no-such-model", "text_1": QUERY, "text_2": "x"}
    assert error_of(client.post("/v1/score", json=body), 404)["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/rerank", {"query": QUERY, "documents": []}, "documents"),
        ("/v1/rerank", {"query": QUERY, "documents": ["ok", ""]}, "documents"),
        ("/v1/rerank", {"query": "", "documents": DOCUMENTS}, "query"),
        ("/v1/rerank", {"query": QUERY, "documents": DOCUMENTS, "top_n": -1}, "top_n"),
        (
            "/v1/rerank",
            {"query": QUERY, "documents": DOCUMENTS, "rank_fields": ["a"]},
            "rank_fields",
        ),
        ("/v1/score", {"text_1": ["a", "b"], "text_2": ["c"]}, "text_2"),
        ("/v1/score", {"text_1": [], "text_2": "c"}, "text_1"),
    ],
)
def test_invalid_bodies_are_400_naming_the_field(
    client: httpx.Client, path: str, fields: dict[str, Any], param: str
) -> None:
    error = error_of(client.post(path, json={"model": EMBED_MODEL, **fields}), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_a_document_over_the_context_is_400_naming_it(client: httpx.Client) -> None:
    documents = ["short", "word " * 2000]
    response = client.post(
        "/v1/rerank", json={"model": EMBED_MODEL, "query": QUERY, "documents": documents}
    )
    error = error_of(response, 400)
    assert error["param"] == "documents" and error["code"] == "context_length_exceeded"
    assert error["message"].startswith("documents[1] has ")
