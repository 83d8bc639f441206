"""Protocol <-> engine translation: the call sent to a model replica, and the chunks sent back.

Ingress side: request body -> GenerateCall (plain, picklable). Replica side: GenerateCall ->
prompt token ids. Ingress side again: engine deltas -> OpenAI chunk / response dicts.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from serve_app.engine.types import SamplingParams
from serve_app.errors import APIError, ContextLengthExceededError, InvalidRequestError
from serve_app.protocol import ChatCompletionRequest, CompletionRequest

Endpoint = Literal["chat", "completions"]


@dataclass(slots=True)
class GenerateCall:
    """What the ingress sends a model replica for one generation."""

    request_id: str
    endpoint: Endpoint
    sampling: SamplingParams
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str | list[int] = ""


@dataclass(slots=True)
class Admitted:
    """First event of every generation stream: the prompt was accepted."""

    num_prompt_tokens: int


@dataclass(slots=True)
class Rejected:
    """First (and only) event when the replica refuses the call: an APIError, as plain fields
    that cross the handle (the ingress raises `to_error()` to answer it)."""

    status_code: int
    message: str
    error_type: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_error(cls, error: APIError) -> Rejected:
        return cls(
            error.status_code,
            error.message,
            error.error_type,
            error.param,
            error.code,
            dict(error.headers),
        )

    def to_error(self) -> APIError:
        error = APIError(self.message, param=self.param, code=self.code, headers=self.headers)
        error.status_code = self.status_code
        error.error_type = self.error_type
        return error


def new_request_id() -> str:
    return uuid.uuid4().hex


def sampling_params(body: ChatCompletionRequest | CompletionRequest) -> SamplingParams:
    return SamplingParams(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop_strings(),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        ignore_eos=body.ignore_eos,
    )


def chat_call(body: ChatCompletionRequest, request_id: str) -> GenerateCall:
    messages = [{"role": _template_role(m.role), "content": m.text()} for m in body.messages]
    return GenerateCall(request_id, "chat", sampling_params(body), messages=messages)


def completion_call(body: CompletionRequest, request_id: str) -> GenerateCall:
    prompt = body.prompt if isinstance(body.prompt, (str, list)) else str(body.prompt)
    return GenerateCall(request_id, "completions", sampling_params(body), prompt=prompt)  # type: ignore[arg-type]


def _template_role(role: str) -> str:
    return "system" if role == "developer" else role  # chat templates predate "developer"


# ---- replica side ------------------------------------------------------------------------


_MAX_TOKENIZER_MESSAGE = 500  # characters of a template's or tokenizer's own message shown


def prompt_token_ids(call: GenerateCall, tokenizer: Any, max_model_len: int) -> list[int]:
    """Applies the chat template or tokenizes the prompt, then checks the context length.

    Raises InvalidRequestError (400, naming `messages` or `prompt`) for input the template or
    tokenizer refuses, e.g. a template's `raise_exception("roles must alternate")`. CPU-bound
    for long prompts: the replica calls it off its event loop.
    """
    try:
        ids = _encode(call, tokenizer)
    except APIError:
        raise
    except Exception as exc:  # jinja2's TemplateError, the tokenizer's ValueError, ...
        raise _refused_input(call, exc) from exc
    _check_context(len(ids), call, max_model_len)
    return ids


def _encode(call: GenerateCall, tokenizer: Any) -> list[int]:
    if call.endpoint == "chat":
        return _chat_ids(call, tokenizer)
    if isinstance(call.prompt, list):
        return _checked_token_ids(call.prompt, tokenizer)
    return list(tokenizer(call.prompt)["input_ids"])


def _refused_input(call: GenerateCall, exc: Exception) -> InvalidRequestError:
    param = _prompt_param(call)
    what = "the chat template" if call.endpoint == "chat" else "the tokenizer"
    detail = str(exc)[:_MAX_TOKENIZER_MESSAGE] or type(exc).__name__
    return InvalidRequestError(
        f"This model's {what} refused the {param}: {detail}", param=param, code="invalid_value"
    )


def _prompt_param(call: GenerateCall) -> str:
    return "messages" if call.endpoint == "chat" else "prompt"


def _chat_ids(call: GenerateCall, tokenizer: Any) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "This model is a base model without a chat template; use /v1/completions.",
            param="model",
            code="chat_not_supported",
        )
    encoded = tokenizer.apply_chat_template(
        call.messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _checked_token_ids(ids: list[int], tokenizer: Any) -> list[int]:
    vocab_size = len(tokenizer)
    if any(not 0 <= i < vocab_size for i in ids):
        raise InvalidRequestError(
            f"prompt token ids must be in [0, {vocab_size})", param="prompt", code="invalid_value"
        )
    return list(ids)


def _check_context(num_prompt_tokens: int, call: GenerateCall, max_model_len: int) -> None:
    param = _prompt_param(call)
    max_tokens = call.sampling.max_tokens or 1
    if num_prompt_tokens + max_tokens > max_model_len:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
            f"{param}, {max_tokens} in the completion). Please reduce the length of the "
            f"{param} or completion.",
            param=param,
        )


# ---- ingress side: OpenAI response shapes ------------------------------------------------


@dataclass(slots=True)
class ResponseIds:
    """The fixed parts of every chunk of one response."""

    request_id: str
    model: str
    endpoint: Endpoint
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def response_id(self) -> str:
        prefix = "chatcmpl" if self.endpoint == "chat" else "cmpl"
        return f"{prefix}-{self.request_id}"


def stream_chunk(
    ids: ResponseIds, text: str | None, finish_reason: str | None, *, role: bool = False
) -> dict[str, Any]:
    if ids.endpoint == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or ""}
        obj = "text_completion"
    choice.update(logprobs=None, finish_reason=finish_reason)
    return _envelope(ids, obj, [choice])


def usage_chunk(ids: ResponseIds, num_prompt: int, num_completion: int) -> dict[str, Any]:
    obj = "chat.completion.chunk" if ids.endpoint == "chat" else "text_completion"
    return {**_envelope(ids, obj, []), "usage": usage(num_prompt, num_completion)}


def full_response(
    ids: ResponseIds, text: str, finish_reason: str, num_prompt: int, num_completion: int
) -> dict[str, Any]:
    if ids.endpoint == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text}
        obj = "text_completion"
    choice.update(logprobs=None, finish_reason=finish_reason)
    return {**_envelope(ids, obj, [choice]), "usage": usage(num_prompt, num_completion)}


def usage(num_prompt: int, num_completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
    }


def _envelope(ids: ResponseIds, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": ids.response_id,
        "object": obj,
        "created": ids.created,
        "model": ids.model,
        "choices": choices,
    }
