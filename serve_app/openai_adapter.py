"""Protocol <-> engine translation: the call sent to a model replica and what comes back.

Ingress side: request body -> GenerateCall (plain, picklable: sampling, constraint, tools
rendered into the messages). Replica side: GenerateCall -> prompt token ids. The chunks and
bodies sent to the client are built by serve_app/response_builder.py.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from serve_app.engine.types import Constraint, RequestOutput, SamplingParams
from serve_app.errors import APIError, ContextLengthExceededError, InvalidRequestError
from serve_app.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    ResponseFormat,
    StructuredOutputs,
    TokenizeRequest,
)
from serve_app.tool_calls import ToolChoice, output_schema, render_messages

Endpoint = Literal["chat", "completions"]


@dataclass(slots=True)
class GenerateCall:
    """What the ingress sends a model replica for one generation."""

    request_id: str
    endpoint: Endpoint
    sampling: SamplingParams
    messages: list[dict[str, Any]] = field(default_factory=list)
    prompt: str | list[int] = ""
    num_choices: int = 1  # n: each choice decodes on its own from one prefill
    echo: bool = False  # completions: the prompt's text comes back before the answer
    constraint_param: str | None = None  # the request field the constraint came from


@dataclass(slots=True)
class Admitted:
    """First event of every generation stream: the prompt was accepted."""

    num_prompt_tokens: int
    echo_text: str = ""  # the prompt's text, when the call asked for echo


@dataclass(slots=True)
class ChoiceOutput:
    """An engine delta of choice `index`, for calls with more than one choice (n > 1)."""

    index: int
    output: RequestOutput


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


def sampling_params(
    body: ChatCompletionRequest | CompletionRequest, constraint: Constraint | None
) -> SamplingParams:
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
        logit_bias=body.logit_bias_pairs(),
        logprobs=body.num_logprobs(),
        constraint=constraint,
    )


def tool_choice(body: ChatCompletionRequest) -> ToolChoice | None:
    """The tools the model may call, or None when it answers in plain text."""
    choice = body.tool_choice
    if not body.tools or choice == "none":
        return None
    functions = [tool.function.model_dump(exclude_none=True) for tool in body.tools]
    is_parallel = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        named = [f for f in functions if f["name"] == choice.function.name]
        return ToolChoice(named, "named", is_parallel=False)
    return ToolChoice(functions, "required" if choice == "required" else "auto", is_parallel)


def chat_call(body: ChatCompletionRequest, request_id: str) -> GenerateCall:
    tools = tool_choice(body)
    messages = render_messages([_template_message(m) for m in body.messages], tools)
    constraint, param = _output_constraint(body)
    if tools is not None:
        constraint, param = Constraint("json_schema", json.dumps(output_schema(tools))), "tools"
    return GenerateCall(
        request_id,
        "chat",
        sampling_params(body, constraint),
        messages=messages,
        num_choices=body.n,
        constraint_param=param,
    )


def completion_call(body: CompletionRequest, request_id: str) -> GenerateCall:
    prompt = body.prompt if isinstance(body.prompt, (str, list)) else str(body.prompt)
    constraint, param = _output_constraint(body)
    return GenerateCall(
        request_id,
        "completions",
        sampling_params(body, constraint),
        prompt=prompt,  # type: ignore[arg-type]
        num_choices=body.n,
        echo=body.echo,
        constraint_param=param,
    )


def tokenize_call(body: TokenizeRequest, request_id: str) -> GenerateCall:
    """The prompt of a /tokenize request, as a chat or completions call would carry it."""
    if body.messages is not None:
        messages = render_messages([_template_message(m) for m in body.messages], None)
        return GenerateCall(request_id, "chat", SamplingParams(), messages=messages)
    return GenerateCall(request_id, "completions", SamplingParams(), prompt=body.prompt or "")


def _output_constraint(
    body: ChatCompletionRequest | CompletionRequest,
) -> tuple[Constraint | None, str | None]:
    """The grammar response_format or structured_outputs asks for, and that field's name."""
    if body.structured_outputs is not None:
        return _structured_constraint(body.structured_outputs), "structured_outputs"
    if body.response_format is not None and body.response_format.type != "text":
        return _format_constraint(body.response_format), "response_format"
    return None, None


def _format_constraint(response_format: ResponseFormat) -> Constraint:
    if response_format.type == "json_object" or response_format.json_schema is None:
        return Constraint("json_object")
    schema = response_format.json_schema.schema_ or {}
    return Constraint("json_schema", json.dumps(schema, sort_keys=False))


def _structured_constraint(outputs: StructuredOutputs) -> Constraint:
    if outputs.json_ is not None:
        schema = outputs.json_ if isinstance(outputs.json_, str) else json.dumps(outputs.json_)
        return Constraint("json_schema", schema)
    if outputs.regex is not None:
        return Constraint("regex", outputs.regex)
    if outputs.choice is not None:
        return Constraint("choice", json.dumps(outputs.choice))
    return Constraint("grammar", outputs.grammar or "")


def _template_message(message: Any) -> dict[str, Any]:
    rendered: dict[str, Any] = {"role": _template_role(message.role), "content": message.text()}
    if message.tool_calls:
        rendered["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.tool_call_id:
        rendered["tool_call_id"] = message.tool_call_id
    return rendered


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
    ids = encode_prompt(call, tokenizer)
    _check_context(len(ids), call, max_model_len)
    return ids


def encode_prompt(call: GenerateCall, tokenizer: Any, add_special_tokens: bool = True) -> list[int]:
    """The call's prompt ids (chat template applied), without the context check; 400 for input
    the template or tokenizer refuses."""
    try:
        if not add_special_tokens and isinstance(call.prompt, str) and call.endpoint != "chat":
            return list(tokenizer(call.prompt, add_special_tokens=False)["input_ids"])
        return _encode(call, tokenizer)
    except APIError:
        raise
    except Exception as exc:  # jinja2's TemplateError, the tokenizer's ValueError, ...
        raise _refused_input(call, exc) from exc


def decode_ids(ids: list[int], tokenizer: Any) -> str:
    """/detokenize: the text of token ids (400 for an id outside the vocabulary)."""
    return str(tokenizer.decode(_checked_token_ids(ids, tokenizer, param="tokens")))


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


def _checked_token_ids(ids: list[int], tokenizer: Any, param: str = "prompt") -> list[int]:
    vocab_size = len(tokenizer)
    if any(not 0 <= i < vocab_size for i in ids):
        raise InvalidRequestError(
            f"{param} token ids must be in [0, {vocab_size})", param=param, code="invalid_value"
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
