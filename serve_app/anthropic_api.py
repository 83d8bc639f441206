"""Anthropic Messages API (POST /v1/messages) as a layer over chat completions.

The route parses its body into `MessagesRequest`, runs `chat_body_from_messages(req)` through
the chat path, and turns the chat.completion back with `message_from_chat` (a streamed one with
serve_app.anthropic_stream.MessagesStream). `cache_control` is accepted wherever Anthropic
allows it and changes nothing: the engine's prefix cache needs no hints.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from serve_app.protocol import (
    MAX_MESSAGES,
    MAX_STOP_STRINGS,
    _integral,
    _Request,
    cached_tokens,
    check_kinds,
)

_BLOCKS = ("text", "tool_use", "tool_result")
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# OpenAI-shaped error types (serve_app.errors) -> Anthropic's error types
_ERROR_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "rate_limit_error": "rate_limit_error",
    "timeout": "timeout_error",
    "service_unavailable": "overloaded_error",
}


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


CacheControl = dict[str, Any] | None  # accepted, no effect


def _str_or_list(value: Any) -> str:
    # Tags named as pydantic names union branches, so an error reports only the branch the
    # value is (never "Input should be a valid string" for a bad block list).
    return "str" if isinstance(value, str) else "list[blocks]"


class TextBlock(_Request):
    type: Literal["text"]
    text: str
    cache_control: CacheControl = None


TextBlocks = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[TextBlock], Tag("list[blocks]")],
    Discriminator(_str_or_list),
]


class ToolUseBlock(_Request):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]
    cache_control: CacheControl = None


class ToolResultBlock(_Request):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: TextBlocks = ""
    is_error: bool = False
    cache_control: CacheControl = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        check_kinds(content, ("text",), "tool_result content (text-only models)")
        return content

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else _joined(self.content)
        return f"Error: {text}" if self.is_error else text  # chat has no is_error flag


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")]
Blocks = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[Block], Tag("list[blocks]")],
    Discriminator(_str_or_list),
]


class InputMessage(_Request):
    role: Literal["user", "assistant", "system"]
    content: Blocks

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, content: Any) -> Any:
        # image, document, thinking, server tool blocks: the served models read text only
        check_kinds(content, _BLOCKS, "content (text-only models)")
        return content

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> InputMessage:
        blocks = [] if isinstance(self.content, str) else self.content
        allowed = {"user": ToolResultBlock, "assistant": ToolUseBlock}.get(self.role, TextBlock)
        for block in blocks:
            if not isinstance(block, TextBlock | allowed):
                raise ValueError(f"{block.type} blocks do not belong in {self.role} messages")
        return self


class Tool(_Request):
    type: Literal["custom"] | None = None
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None
    cache_control: CacheControl = None


class ToolChoiceAuto(_Request):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(_Request):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(_Request):
    type: Literal["tool"]
    name: str = Field(min_length=1)
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(_Request):
    type: Literal["none"]


ToolChoice = Annotated[
    ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")
]


class Metadata(_Request):
    user_id: str | None = None


class MessagesRequest(_Request):
    """The body of POST /v1/messages; what the served models cannot do is refused by name."""

    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    messages: list[InputMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: TextBlocks | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    thinking: None = None

    @field_validator("max_tokens", "top_k", mode="before")
    @classmethod
    def _integral_numbers(cls, value: Any) -> Any:
        return _integral(value)

    @field_validator("stop_sequences")
    @classmethod
    def _check_stop(cls, stop: list[str] | None) -> list[str] | None:
        if stop and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are supported")
        if stop and any(not s for s in stop):
            raise ValueError("stop sequences must not be empty")
        return stop

    @field_validator("system", mode="before")
    @classmethod
    def _text_system(cls, system: Any) -> Any:
        check_kinds(system, ("text",), "system (text-only models)")
        return system

    @field_validator("tools", mode="before")
    @classmethod
    def _client_tools_only(cls, tools: Any) -> Any:
        check_kinds(tools, ("custom",), "tools (server tools are not served)", default="custom")
        return tools

    @field_validator("thinking", mode="before")
    @classmethod
    def _no_thinking(cls, thinking: Any) -> Any:
        if thinking is None or (isinstance(thinking, dict) and thinking == {"type": "disabled"}):
            return None
        raise ValueError("thinking is not supported: the served models have no thinking mode")


# ---- request: Messages -> chat completions ----------------------------------------------


def chat_body_from_messages(req: MessagesRequest) -> dict[str, Any]:
    """The chat-completions request body (OpenAI wire format) that serves `req`."""
    body: dict[str, Any] = {
        "model": req.model,
        "messages": _chat_messages(req),
        "max_tokens": req.max_tokens,
    }
    if req.stream:
        body.update(stream=True, stream_options={"include_usage": True})
    optional = {
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "stop": req.stop_sequences or None,
        "user": req.metadata.user_id if req.metadata else None,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    if req.tools:
        body["tools"] = [_chat_tool(tool) for tool in req.tools]
    if req.tool_choice is not None:
        body["tool_choice"] = _chat_tool_choice(req.tool_choice)
        if getattr(req.tool_choice, "disable_parallel_tool_use", None):
            body["parallel_tool_calls"] = False
    return body


def _chat_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if req.system:
        messages.append({"role": "system", "content": _chat_text(req.system)})
    for message in req.messages:
        if message.role == "assistant":
            messages.append(_assistant_message(message.content))
        elif message.role == "user":
            messages += _user_messages(message.content)
        else:
            messages.append({"role": "system", "content": _chat_text(message.content)})
    return messages


def _chat_text(content: str | list[Any]) -> str | list[dict[str, str]]:
    if isinstance(content, str):
        return content
    return [{"type": "text", "text": block.text} for block in content]


def _user_messages(content: str | list[Any]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    # Chat wants each tool result right after the assistant's calls, before any new text.
    results = [block for block in content if isinstance(block, ToolResultBlock)]
    texts = [block for block in content if isinstance(block, TextBlock)]
    messages: list[dict[str, Any]] = [
        {"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()}
        for block in results
    ]
    if texts or not results:
        messages.append({"role": "user", "content": _chat_text(texts)})
    return messages


def _assistant_message(content: str | list[Any]) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    text = _joined([block for block in content if isinstance(block, TextBlock)])
    calls = [_chat_call(block) for block in content if isinstance(block, ToolUseBlock)]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return message


def _chat_call(block: ToolUseBlock) -> dict[str, Any]:
    arguments = json.dumps(block.input, ensure_ascii=False)
    return {
        "id": block.id,
        "type": "function",
        "function": {"name": block.name, "arguments": arguments},
    }


def _joined(blocks: list[TextBlock]) -> str:
    return "".join(block.text for block in blocks)


def _chat_tool(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def _chat_tool_choice(
    choice: ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone,
) -> str | dict[str, Any]:
    if isinstance(choice, ToolChoiceTool):
        return {"type": "function", "function": {"name": choice.name}}
    return "required" if isinstance(choice, ToolChoiceAny) else choice.type


# ---- response: chat completion -> Messages ----------------------------------------------


def message_from_chat(
    completion: dict[str, Any], req: MessagesRequest, message_id: str
) -> dict[str, Any]:
    """The Anthropic `message` for a non-streamed chat.completion dict.

    finish_reason "stop" is `end_turn` even when a stop sequence ended the text: the chat path
    does not say which one matched, so `stop_sequence` stays null.
    Raises ValueError when a tool call's arguments are not a JSON object.
    """
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        content.append(_tool_use_block(call))
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": content,
        "stop_reason": stop_reason(choice.get("finish_reason")),
        "stop_sequence": None,
        "usage": usage_from_chat(completion.get("usage")),
    }


def stop_reason(finish_reason: str | None) -> str:
    return _STOP_REASONS.get(finish_reason or "stop", "end_turn")


def _tool_use_block(call: dict[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    name = function.get("name", "")
    try:
        tool_input = json.loads(function.get("arguments") or "{}")
    except json.JSONDecodeError:
        tool_input = None
    if not isinstance(tool_input, dict):
        raise ValueError(f"the arguments of the call to {name!r} are not a JSON object")
    call_id = call.get("id") or f"toolu_{uuid.uuid4().hex}"
    return {"type": "tool_use", "id": call_id, "name": name, "input": tool_input}


def usage_from_chat(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    cached = cached_tokens(usage)
    return {  # Anthropic's input_tokens leave out what was read from the cache
        "input_tokens": usage.get("prompt_tokens", 0) - cached,
        "output_tokens": usage.get("completion_tokens", 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def anthropic_error(error: dict[str, Any]) -> dict[str, Any]:
    """Anthropic's error body for an OpenAI-shaped error detail {message, type, param, code}."""
    kind = _ERROR_TYPES.get(str(error.get("type")), "api_error")
    if error.get("code") == "model_not_found":
        kind = "not_found_error"
    message = str(error.get("message") or "generation failed")
    return {"type": "error", "error": {"type": kind, "message": message}}
