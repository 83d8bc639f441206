"""Pydantic models of what the OpenAI routes send back: bodies and stream chunks.

serve_app/response_builder.py builds every chunk and body from these (dumped with
`exclude_unset`, so a delta carries only what it sets, while `finish_reason` and `logprobs`
are always sent, null or not, as OpenAI does), and the routes declare them as their response
models, so /openapi.json documents them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from serve_app.protocol import Usage


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopLogprob(_Wire):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Wire):
    content: list[TokenLogprobEntry] | None = None
    refusal: None = None


class CompletionLogprobs(_Wire):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class FunctionCallOut(_Wire):
    name: str | None = None  # in a stream: only in a call's first delta
    arguments: str


class ToolCallOut(_Wire):
    index: int | None = None  # in a stream: which call a delta adds to
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallOut


class AssistantMessage(_Wire):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    reasoning_content: str | None = None  # extension: the text between <think> tags


class ChatDelta(_Wire):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    reasoning_content: str | None = None


class ChatChoice(_Wire):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatChunkChoice(_Wire):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class CompletionChoice(_Wire):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class _Envelope(_Wire):
    id: str
    created: int
    model: str


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # only on the last chunk, with stream_options.include_usage


class CompletionResponse(_Envelope):
    """Both the body and each stream chunk of /v1/completions (OpenAI uses one shape)."""

    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage | None = None


def dumped(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(exclude_unset=True)
