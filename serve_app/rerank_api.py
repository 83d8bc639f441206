"""Rerank (Cohere/Jina) and score requests in vLLM's shapes, answered by an embedding model: the
ingress embeds every text in one call, these functions turn the vectors into the response body
(score = cosine similarity)."""

from __future__ import annotations

import math
import re
import time
import uuid
from typing import Annotated, Any

from pydantic import Field, ValidationInfo, field_validator

from serve_app.errors import APIError
from serve_app.protocol import _integral, _Request

MAX_RERANK_DOCUMENTS = 1000  # Cohere's recommended maximum per request
MAX_SCORE_TEXTS = 1000  # per side: text_1 and text_2 together stay under the embedding limit

ScoreTexts = Annotated[list[str], Field(min_length=1, max_length=MAX_SCORE_TEXTS)]
Vector = list[float]


def _no_empty_text(cls: type, value: str | list[str], info: ValidationInfo) -> str | list[str]:
    if any(not text for text in _as_list(value)):
        raise ValueError(f"{info.field_name} must not be or contain an empty string")
    return value


class RerankRequest(_Request):
    model: str = Field(min_length=1)
    query: str
    documents: list[str] = Field(min_length=1, max_length=MAX_RERANK_DOCUMENTS)
    top_n: int | None = Field(None, ge=0, description="null or 0 (vLLM's default): every document")
    return_documents: bool = True

    _non_empty = field_validator("query", "documents")(_no_empty_text)

    @field_validator("top_n", mode="before")
    @classmethod
    def _integral_top_n(cls, value: Any) -> Any:
        return _integral(value)

    def texts(self) -> list[str]:
        """What the embedding model encodes: the query, then each document."""
        return [self.query, *self.documents]

    def text_params(self) -> list[str]:
        return ["query", *(f"documents[{i}]" for i in range(len(self.documents)))]


class ScoreRequest(_Request):
    """Pairs as vLLM forms them: 1:1 (two strings), 1:N (text_1 one text) or N:N (same lengths)."""

    model: str = Field(min_length=1)
    text_1: str | ScoreTexts
    text_2: str | ScoreTexts

    _non_empty = field_validator("text_1", "text_2")(_no_empty_text)

    @field_validator("text_2")
    @classmethod
    def _pairs(cls, value: str | list[str], info: ValidationInfo) -> str | list[str]:
        text_1 = info.data.get("text_1")  # absent when text_1 itself was invalid
        num_1 = 1 if isinstance(text_1, str) else len(text_1 or [1])
        num_2 = 1 if isinstance(value, str) else len(value)
        if num_1 > 1 and num_1 != num_2:
            raise ValueError(
                f"text_1 has {num_1} texts and text_2 {num_2}: pair them 1:1, 1:N or N:N"
            )
        return value

    def texts(self) -> list[str]:
        """What the embedding model encodes: text_1's texts, then text_2's."""
        return [*_as_list(self.text_1), *_as_list(self.text_2)]

    def text_params(self) -> list[str]:
        return [
            *(f"text_1[{i}]" for i in range(len(_as_list(self.text_1)))),
            *(f"text_2[{i}]" for i in range(len(_as_list(self.text_2)))),
        ]

    def pairs(self) -> list[tuple[int, int]]:
        """Indices into texts() of each scored pair, in text_2's order."""
        num_1, num_2 = len(_as_list(self.text_1)), len(_as_list(self.text_2))
        return [(0 if num_1 == 1 else i, num_1 + i) for i in range(num_2)]


def _as_list(text: str | list[str]) -> list[str]:
    return [text] if isinstance(text, str) else text


def cosine(a: Vector, b: Vector) -> float:
    # The model returns unit vectors; normalizing again keeps the score in [-1, 1] regardless.
    norm = math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))
    if norm == 0.0:
        return 0.0
    return max(-1.0, min(1.0, math.fsum(x * y for x, y in zip(a, b, strict=True)) / norm))


def rerank_body(body: RerankRequest, vectors: list[Vector], num_tokens: int) -> dict[str, Any]:
    """vLLM's RerankResponse: results by relevance_score (desc), cut to top_n; `vectors` are
    texts()'s, the query's first."""
    query, documents = vectors[0], vectors[1:]
    scores = [cosine(query, document) for document in documents]
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep input order
    results = []
    for index in order[: body.top_n or None]:
        result: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
        if body.return_documents:
            result["document"] = {"text": body.documents[index]}
        results.append(result)
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": body.model,
        "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
        "results": results,
    }


def score_body(body: ScoreRequest, vectors: list[Vector], num_tokens: int) -> dict[str, Any]:
    """vLLM's ScoreResponse: one score per pair, in text_2's order; `vectors` are texts()'s."""
    data = [
        {"index": index, "object": "score", "score": cosine(vectors[i], vectors[j])}
        for index, (i, j) in enumerate(body.pairs())
    ]
    return {
        "id": f"score-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": body.model,
        "data": data,
        "usage": {"prompt_tokens": num_tokens, "completion_tokens": 0, "total_tokens": num_tokens},
    }


_INPUT_INDEX = re.compile(r"^input\[(\d+)\]")


def rename_input_error(error: APIError, text_params: list[str]) -> APIError:
    """The embedding replica names a text too long as `input[i]` (its /v1/embeddings view);
    here it is `query`, `documents[k]`, `text_1[k]` or `text_2[k]` (text_params()'s names)."""
    match = _INPUT_INDEX.match(error.message)
    if error.param != "input" or match is None or int(match[1]) >= len(text_params):
        return error
    name = text_params[int(match[1])]
    error.message = name + error.message[match.end() :]
    error.param = name.split("[")[0]
    return error
