"""OpenAI Responses API (POST /v1/responses) as a stateless layer over chat completions.

The route parses its body into `ResponsesRequest`, runs `chat_body_from_responses(req)` through
the chat path, and turns the chat.completion back with `response_from_chat` (a streamed one
with serve_app.responses_stream.ResponsesStream).

Nothing is stored: `store` is accepted (true or false) and ignored, and the answer says
`"store": false`; whatever needs a stored response or conversation is refused by name.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator

from serve_app.protocol import MAX_MESSAGES, _Request, cached_tokens, check_kinds

_TEXT_PARTS = ("input_text", "output_text")
_ITEM_KINDS = ("message", "function_call", "function_call_output")
_STATEFUL = {
    "previous_response_id": "this server stores no responses; send the whole conversation "
    "as input items",
    "conversation": "this server stores no conversations; send the whole conversation as input",
    "prompt": "stored prompt templates are not supported; send instructions and input",
    "background": "background responses are not supported (nothing is stored to poll)",
}


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


class TextPart(_Request):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # sent back with replayed output items; unused
    logprobs: list[Any] | None = None


def _str_or_list(value: Any) -> str:
    # Tags named as pydantic names union branches, so an error reports only the branch the
    # value is (never "Input should be a valid string" for a bad part list).
    return "str" if isinstance(value, str) else "list[parts]"


TextParts = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[TextPart], Tag("list[parts]")],
    Discriminator(_str_or_list),
]


class InputMessage(_Request):
    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: TextParts
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        check_kinds(content, _TEXT_PARTS, "content")  # input_image, input_file: refused
        return content


class FunctionCallItem(_Request):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(_Request):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: TextParts
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @field_validator("output", mode="before")
    @classmethod
    def _text_only(cls, output: Any) -> Any:
        check_kinds(output, _TEXT_PARTS, "output")
        return output


def _item_kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("type", "message"))
    return str(getattr(value, "type", None) or "message")


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind),
]


class FunctionTool(_Request):
    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Request):
    type: Literal["function"]
    name: str = Field(min_length=1)


class FormatText(_Request):
    type: Literal["text"]


class FormatJsonObject(_Request):
    type: Literal["json_object"]


class FormatJsonSchema(_Request):
    type: Literal["json_schema"]
    name: str = Field(min_length=1)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Request):
    format: (
        Annotated[FormatText | FormatJsonObject | FormatJsonSchema, Field(discriminator="type")]
        | None
    ) = None


def _also_a_string(schema: dict[str, Any]) -> None:
    """The documented schema of `input`: a string, or the list of items it stands for."""
    items = {key: schema.pop(key) for key in list(schema) if key not in ("title", "description")}
    schema["anyOf"] = [{"type": "string"}, items]


class ResponsesRequest(_Request):
    """The body of POST /v1/responses; the fields we do not serve are refused by name."""

    model: str = Field(min_length=1)
    input: list[InputItem] = Field(  # a str becomes one user message item
        min_length=1, max_length=MAX_MESSAGES, json_schema_extra=_also_a_string
    )
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None  # accepted either way; nothing is ever stored
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None
    previous_response_id: None = None
    conversation: None = None
    prompt: None = None
    # false is accepted (it is what we do); the schema says so, so fuzzers send it as valid.
    background: Literal[False] | None = None  # the before-validator refuses 0 (== False)

    @field_validator("input", mode="before")
    @classmethod
    def _known_items(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        check_kinds(value, _ITEM_KINDS, "input", default="message")
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, value: Any) -> Any:
        check_kinds(value, ("function",), "tools (built-in tools are not served)")
        return value

    @field_validator(*_STATEFUL, mode="before")
    @classmethod
    def _refuse_stateful(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or (info.field_name == "background" and value is False):
            return value
        raise ValueError(f"{info.field_name} is not supported: {_STATEFUL[str(info.field_name)]}")


# ---- request: Responses -> chat completions ---------------------------------------------


def chat_body_from_responses(req: ResponsesRequest) -> dict[str, Any]:
    """The chat-completions request body (OpenAI wire format) that serves `req`."""
    body: dict[str, Any] = {"model": req.model, "messages": _chat_messages(req)}
    if req.stream:
        body.update(stream=True, stream_options={"include_usage": True})
    optional = {
        "max_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "user": req.user,
        "parallel_tool_calls": req.parallel_tool_calls,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    if req.tools:
        body["tools"] = [_chat_tool(tool) for tool in req.tools]
    if req.tool_choice is not None:
        body["tool_choice"] = _chat_tool_choice(req.tool_choice)
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and not isinstance(fmt, FormatText):
        body["response_format"] = _response_format(fmt)
    return body


def _chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if req.instructions is not None:
        messages.append({"role": "system", "content": req.instructions})
    for item in req.input:
        _append_item(messages, item)
    return messages


def _append_item(
    messages: list[dict[str, Any]],
    item: InputMessage | FunctionCallItem | FunctionCallOutputItem,
) -> None:
    if isinstance(item, FunctionCallItem):
        call = {
            "id": item.call_id,
            "type": "function",
            "function": {"name": item.name, "arguments": item.arguments},
        }
        if messages and messages[-1]["role"] == "assistant":  # one assistant turn, many calls
            messages[-1].setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif isinstance(item, FunctionCallOutputItem):
        output = item.output if isinstance(item.output, str) else _joined(item.output)
        messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    else:
        messages.append({"role": item.role, "content": _chat_content(item.content)})


def _joined(parts: list[TextPart]) -> str:
    return "".join(part.text for part in parts)


def _chat_content(content: str | list[TextPart]) -> str | list[dict[str, str]]:
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": part.text} for part in content]


def _chat_tool(tool: FunctionTool) -> dict[str, Any]:
    function = tool.model_dump(exclude={"type"}, exclude_none=True)
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | NamedFunction) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    return {"type": "function", "function": {"name": choice.name}}


def _response_format(fmt: FormatJsonObject | FormatJsonSchema) -> dict[str, Any]:
    if isinstance(fmt, FormatJsonObject):
        return {"type": "json_object"}
    json_schema = fmt.model_dump(exclude={"type"}, exclude_none=True, by_alias=True)
    return {"type": "json_schema", "json_schema": json_schema}


# ---- response: chat completion -> Responses ---------------------------------------------


def response_from_chat(
    completion: dict[str, Any], req: ResponsesRequest, response_id: str
) -> dict[str, Any]:
    """The `response` object for a non-streamed chat.completion dict."""
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    status = response_status(choice.get("finish_reason"))
    item_status = "incomplete" if status == "incomplete" else "completed"
    output: list[dict[str, Any]] = []
    text, calls = message.get("content") or "", message.get("tool_calls") or []
    if text or not calls:
        output.append(message_item(f"msg_{uuid.uuid4().hex}", text, item_status))
    for call in calls:
        function = call.get("function") or {}
        output.append(
            function_item(
                f"fc_{uuid.uuid4().hex}",
                call.get("id") or f"call_{uuid.uuid4().hex}",
                function.get("name", ""),
                function.get("arguments", ""),
                "completed",
            )
        )
    created_at = int(completion.get("created") or time.time())
    usage = usage_from_chat(completion.get("usage"))
    return response_object(req, response_id, created_at, status, output, usage)


def response_status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [text_part(text)]
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": content,
    }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def usage_from_chat(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not usage:
        return None
    return {
        "input_tokens": usage.get("prompt_tokens", 0),
        "input_tokens_details": {"cached_tokens": cached_tokens(usage), "cache_write_tokens": 0},
        "output_tokens": usage.get("completion_tokens", 0),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.get("total_tokens", 0),
    }


def response_object(
    req: ResponsesRequest,
    response_id: str,
    created_at: int,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A `response` object with the request's settings echoed, as OpenAI answers them."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "completed_at": int(time.time()) if status == "completed" else None,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": None,
        "metadata": req.metadata or {},
        "model": req.model,
        "output": output,
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": _echo_text(req),
        "tool_choice": _echo_tool_choice(req),
        "tools": [tool.model_dump() for tool in req.tools or []],
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": req.user,
    }


def _echo_text(req: ResponsesRequest) -> dict[str, Any]:
    if req.text is None or req.text.format is None:
        return {"format": {"type": "text"}}
    return {"format": req.text.format.model_dump(by_alias=True, exclude_none=True)}


def _echo_tool_choice(req: ResponsesRequest) -> str | dict[str, Any]:
    if req.tool_choice is None:
        return "auto"
    return req.tool_choice if isinstance(req.tool_choice, str) else req.tool_choice.model_dump()
