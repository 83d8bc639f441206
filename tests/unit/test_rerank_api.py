"""Rerank and score bodies (serve_app.rerank_api): what is refused, how texts pair, and the
response shapes built from the embedding vectors."""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from deployments.embedding_server import _check_lengths
from serve_app.errors import APIError, InvalidRequestError
from serve_app.rerank_api import (
    MAX_RERANK_DOCUMENTS,
    MAX_SCORE_TEXTS,
    RerankRequest,
    ScoreRequest,
    cosine,
    rename_input_error,
    rerank_body,
    score_body,
)

DOCUMENTS = ["Paris is the capital of France.", "Bananas are yellow.", "Stocks fell."]
# Unit vectors: the query is [1, 0]; documents at cosine 1.0, 0.0 and 0.6 from it.
VECTORS = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]


def rerank(**fields: Any) -> RerankRequest:
    return RerankRequest.model_validate(
        {"model": "m", "query": "q", "documents": DOCUMENTS, **fields}
    )


def score(text_1: Any, text_2: Any) -> ScoreRequest:
    return ScoreRequest.model_validate({"model": "m", "text_1": text_1, "text_2": text_2})


def refused_field(model: type[BaseModel], body: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return str(caught.value.errors()[0]["loc"][0])


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", ""),
        ("model", 1),
        ("query", ""),
        ("query", ["q"]),
        ("documents", []),
        ("documents", "one document"),
        ("documents", ["ok", ""]),
        ("documents", ["ok", 1]),
        ("documents", ["d"] * (MAX_RERANK_DOCUMENTS + 1)),
        ("top_n", -1),
        ("top_n", "2"),
        ("top_n", True),
        ("top_n", 1.5),
        ("return_documents", 1),
        ("return_documents", "false"),
        ("truncate_prompt_tokens", 5),  # unknown (a vLLM extension we do not have): refused
    ],
)
def test_rerank_refuses_each_bad_field_by_name(field: str, value: Any) -> None:
    body = {"model": "m", "query": "q", "documents": DOCUMENTS, field: value}
    assert refused_field(RerankRequest, body) == field


def test_rerank_defaults_and_integral_top_n() -> None:
    body = rerank()
    assert body.top_n is None and body.return_documents is True
    assert rerank(top_n=2.0).top_n == 2  # JSON's 2.0 is an integer
    assert body.texts() == ["q", *DOCUMENTS]
    assert body.text_params() == ["query", "documents[0]", "documents[1]", "documents[2]"]


@pytest.mark.parametrize(
    ("field", "text_1", "text_2"),
    [
        ("text_1", [], "b"),
        ("text_1", "", "b"),
        ("text_1", 1, "b"),
        ("text_2", "a", []),
        ("text_2", "a", ["b", ""]),
        ("text_2", "a", None),
        ("text_2", ["a", "b"], ["c"]),  # N:1 is not a pairing vLLM takes
        ("text_2", ["a", "b"], ["c", "d", "e"]),
        ("text_2", "a", ["b"] * (MAX_SCORE_TEXTS + 1)),
        ("text_1", ["a"] * (MAX_SCORE_TEXTS + 1), "b"),
    ],
)
def test_score_refuses_bad_texts_and_pairings(field: str, text_1: Any, text_2: Any) -> None:
    body = {"model": "m", "text_1": text_1, "text_2": text_2}
    assert refused_field(ScoreRequest, body) == field


@pytest.mark.parametrize(
    ("text_1", "text_2", "texts", "pairs"),
    [
        ("a", "b", ["a", "b"], [(0, 1)]),  # 1:1
        ("a", ["b", "c"], ["a", "b", "c"], [(0, 1), (0, 2)]),  # 1:N
        (["a"], ["b", "c"], ["a", "b", "c"], [(0, 1), (0, 2)]),  # 1:N, text_1 a list
        (["a", "b"], ["c", "d"], ["a", "b", "c", "d"], [(0, 2), (1, 3)]),  # N:N
        (["a"], "b", ["a", "b"], [(0, 1)]),
    ],
)
def test_score_pairs_as_vllm(text_1: Any, text_2: Any, texts: list[str], pairs: list) -> None:
    body = score(text_1, text_2)
    assert body.texts() == texts and body.pairs() == pairs
    assert len(body.text_params()) == len(texts)


# ---- response bodies -------------------------------------------------------------------------


def test_cosine_normalizes_and_is_bounded() -> None:
    assert cosine([3.0, 4.0], [6.0, 8.0]) == pytest.approx(1.0)
    assert cosine([1.0, 0.0], [-2.0, 0.0]) == pytest.approx(-1.0)
    assert cosine([1.0, 1.0], [1.0, 0.0]) == pytest.approx(1 / math.sqrt(2))
    assert cosine([0.0, 0.0], [1.0, 0.0]) == 0.0
    with pytest.raises(ValueError):
        cosine([1.0], [1.0, 0.0])


def test_rerank_body_sorts_by_score_with_documents() -> None:
    result = rerank_body(rerank(), VECTORS, 17)
    assert set(result) == {"id", "model", "usage", "results"} and result["id"].startswith("rerank-")
    assert result["model"] == "m"
    assert result["usage"] == {"prompt_tokens": 17, "total_tokens": 17}
    assert [r["index"] for r in result["results"]] == [0, 2, 1]
    scores = [r["relevance_score"] for r in result["results"]]
    assert scores == pytest.approx([1.0, 0.6, 0.0])
    assert [r["document"] for r in result["results"]] == [
        {"text": DOCUMENTS[0]},
        {"text": DOCUMENTS[2]},
        {"text": DOCUMENTS[1]},
    ]


@pytest.mark.parametrize(("top_n", "num_results"), [(None, 3), (0, 3), (1, 1), (2, 2), (50, 3)])
def test_rerank_body_cuts_to_top_n(top_n: int | None, num_results: int) -> None:
    results = rerank_body(rerank(top_n=top_n), VECTORS, 1)["results"]
    assert [r["index"] for r in results] == [0, 2, 1][:num_results]


def test_rerank_body_without_documents_has_no_document_key() -> None:
    results = rerank_body(rerank(return_documents=False), VECTORS, 1)["results"]
    assert all(set(r) == {"index", "relevance_score"} for r in results)


def test_rerank_ties_keep_the_documents_order() -> None:
    vectors = [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]
    assert [r["index"] for r in rerank_body(rerank(), vectors, 1)["results"]] == [0, 1, 2]


def test_score_body_one_to_many_matches_rerank() -> None:
    body = score("q", DOCUMENTS)
    result = score_body(body, VECTORS, 9)
    assert result["object"] == "list" and result["id"].startswith("score-")
    assert isinstance(result["created"], int) and result["model"] == "m"
    assert result["usage"] == {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}
    assert [d["index"] for d in result["data"]] == [0, 1, 2]
    assert all(d["object"] == "score" for d in result["data"])
    by_index = {
        r["index"]: r["relevance_score"] for r in rerank_body(rerank(), VECTORS, 9)["results"]
    }
    assert [d["score"] for d in result["data"]] == [by_index[i] for i in range(3)]


def test_score_body_pairs_n_to_n() -> None:
    body = score(["a", "b"], ["c", "d"])
    vectors = [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]  # a.c = 0, b.d = 1
    assert [d["score"] for d in score_body(body, vectors, 4)["data"]] == pytest.approx([0.0, 1.0])


# ---- a text over the context, named as this route names it ------------------------------------


def replica_length_error(counts: list[int], max_model_len: int = 10) -> APIError:
    # The replica's own check (deployments/embedding_server.py) makes the error renamed here.
    with pytest.raises(InvalidRequestError) as caught:
        _check_lengths(counts, max_model_len)
    return caught.value


def test_a_long_document_is_named_by_its_index() -> None:
    error = rename_input_error(replica_length_error([3, 4, 99]), rerank().text_params())
    assert error.param == "documents" and error.code == "context_length_exceeded"
    assert error.message.startswith("documents[1] has 99 tokens")


def test_a_long_query_or_score_text_is_named() -> None:
    error = rename_input_error(replica_length_error([99, 1]), rerank().text_params())
    assert error.param == "query" and error.message.startswith("query has 99 tokens")
    params = score(["a", "b"], ["c", "d"]).text_params()
    error = rename_input_error(replica_length_error([1, 1, 1, 99]), params)
    assert error.param == "text_2" and error.message.startswith("text_2[1] has 99 tokens")


def test_other_errors_pass_through_unchanged() -> None:
    error = APIError("model unavailable", param=None, code="model_unavailable")
    assert rename_input_error(error, ["query"]) is error
    assert rename_input_error(error, ["query"]).message == "model unavailable"
