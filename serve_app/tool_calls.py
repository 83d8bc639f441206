"""Tool calling in a generic JSON format any chat model can follow (llama.cpp's generic
handler is the model): the tools are described in a system message, the model answers with
one JSON object, and a grammar built from the tools' schemas makes that object valid:

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    {"response": "plain answer"}            (only when tool_choice is "auto")

`ToolOutputParser` reads that object as it streams: the answer's text becomes content
deltas, each call its id and name first, then the raw text of its arguments. Torch-free: the
ingress parses, the replica only renders the prompt and constrains the output.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

ToolMode = Literal["auto", "required", "named"]
MAX_PARALLEL_CALLS = 8

_RESPONSE_PREFIX = '{"response": "'
_CALLS_PREFIX = '{"tool_calls": ['


@dataclass(slots=True)
class ToolChoice:
    """What the request allows: which tools, whether a call is required, how many at once."""

    tools: list[dict[str, Any]]  # OpenAI function definitions: {name, description, parameters}
    mode: ToolMode
    is_parallel: bool = True


def output_schema(choice: ToolChoice) -> dict[str, Any]:
    """The JSON schema the model's whole answer must match."""
    calls = {
        "type": "array",
        "items": {"anyOf": [_call_schema(tool) for tool in choice.tools]},
        "minItems": 1,
        "maxItems": MAX_PARALLEL_CALLS if choice.is_parallel and choice.mode != "named" else 1,
    }
    with_calls = _object({"tool_calls": calls})
    if choice.mode != "auto":
        return with_calls
    return {"anyOf": [with_calls, _object({"response": {"type": "string"}})]}


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    parameters = tool.get("parameters") or {"type": "object", "properties": {}}
    return _object({"name": {"const": tool["name"]}, "arguments": closed_objects(parameters)})


# Keywords whose value is a schema, or a list or map of schemas.
_SUBSCHEMA = ("items", "not", "if", "then", "else", "contains", "additionalItems")
# allOf is left as written: its parts' properties add up, closing one part would refuse
# the others' keys.
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
# An object that says anything about its other keys is left to say it.
_OPENING_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties", "allOf")


def closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object with `properties` that
    leaves its other keys unset.

    A call's arguments hold the properties its tool declares. JSON Schema's default admits any
    other key, and a small model given that freedom can write keys until max_tokens (SmolLM2
    at 4 bits did, greedily). vLLM's default grammar backend (xgrammar, strict mode) closes
    objects the same way; an explicit `additionalProperties` is kept as written."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SUBSCHEMA:
        if key in closed:
            closed[key] = closed_objects(closed[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(closed.get(key), list):
            closed[key] = closed_objects(closed[key])
    for key in _SUBSCHEMA_MAPS:
        if isinstance(closed.get(key), dict):
            closed[key] = {name: closed_objects(sub) for name, sub in closed[key].items()}
    if isinstance(closed.get("additionalProperties"), dict):
        closed["additionalProperties"] = closed_objects(closed["additionalProperties"])
    # An object with no "properties" at all ({"type": "object"}) means any object: kept open.
    is_open = not any(key in closed for key in _OPENING_KEYS)
    if "properties" in closed and is_open:
        closed["additionalProperties"] = False
    return closed


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def system_prompt(choice: ToolChoice) -> str:
    """Tells the model which tools exist and how to answer."""
    described = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in choice.tools)
    call_form = '{"tool_calls": [{"name": <tool name>, "arguments": <arguments object>}]}'
    if choice.mode == "auto":
        how = (
            f"To call tools, answer with {call_form}. To answer directly, answer with "
            '{"response": <your answer>}.'
        )
    else:
        how = f"Call a tool now: answer with {call_form}."
    return f"You can call these tools:\n{described}\n{how}"


def render_messages(
    messages: list[dict[str, Any]], choice: ToolChoice | None
) -> list[dict[str, Any]]:
    """Chat messages in the plain roles every template knows: the tool system message first,
    earlier calls as the JSON the model writes, tool results as user turns."""
    rendered: list[dict[str, Any]] = []
    if choice is not None:
        rendered.append({"role": "system", "content": system_prompt(choice)})
    was_tool_result = False
    for message in messages:
        plain, is_tool_result = _plain_message(message), message["role"] == "tool"
        if (
            rendered
            and rendered[-1]["role"] == plain["role"]
            and (is_tool_result or was_tool_result)
        ):
            # A tool result became a user turn: join it to its neighbours (templates may
            # insist that roles alternate).
            merged = f"{rendered[-1]['content']}\n\n{plain['content']}"
            rendered[-1] = {**rendered[-1], "content": merged}
        else:
            rendered.append(plain)
        was_tool_result = is_tool_result
    return rendered


def _plain_message(message: dict[str, Any]) -> dict[str, Any]:
    role, content = message["role"], message.get("content") or ""
    if role == "assistant" and message.get("tool_calls"):
        calls = [_written_call(call) for call in message["tool_calls"]]
        return {"role": "assistant", "content": json.dumps({"tool_calls": calls})}
    if role == "tool":
        answered = message.get("tool_call_id", "")
        return {"role": "user", "content": f"Result of tool call {answered}:\n{content}"}
    return {"role": role, "content": content}


def _written_call(call: dict[str, Any]) -> dict[str, Any]:
    function = call["function"]
    try:
        arguments = json.loads(function["arguments"] or "{}")
    except json.JSONDecodeError:
        arguments = function["arguments"]  # the client's own text, kept as it was
    return {"name": function["name"], "arguments": arguments}


# ---- reading the answer ----------------------------------------------------------------


@dataclass(slots=True)
class ParsedCall:
    index: int
    id: str
    name: str
    arguments: str = ""  # raw JSON text so far (complete once `is_complete`)
    is_complete: bool = False


@dataclass(slots=True)
class ToolDelta:
    """What one piece of streamed text added: answer text, new calls, argument text."""

    content: str = ""
    new_calls: list[ParsedCall] = field(default_factory=list)
    arguments: list[tuple[int, str]] = field(default_factory=list)  # (call index, fragment)


class ToolOutputParser:
    """Reads the JSON answer incrementally; feed() returns what each text delta adds."""

    def __init__(self) -> None:
        self.text = ""
        self.calls: list[ParsedCall] = []
        self._num_content_sent = 0  # characters of the decoded answer already sent
        self._content = ""

    def feed(self, text: str) -> ToolDelta:
        self.text += text
        delta = ToolDelta()
        if self.text.startswith(_RESPONSE_PREFIX):
            self._content = _decoded_prefix(self.text[len(_RESPONSE_PREFIX) :])
            delta.content = self._content[self._num_content_sent :]
            self._num_content_sent = len(self._content)
        elif self.text.startswith(_CALLS_PREFIX):
            self._read_calls(delta)
        return delta

    @property
    def content(self) -> str | None:
        """The direct answer (tool_choice auto), or None when the model called tools."""
        return self._content if self.text.startswith(_RESPONSE_PREFIX) else None

    @property
    def complete_calls(self) -> list[ParsedCall]:
        return [call for call in self.calls if call.is_complete]

    def _read_calls(self, delta: ToolDelta) -> None:
        for index, (name, args_start) in enumerate(_call_positions(self.text)):
            if index == len(self.calls):
                call = ParsedCall(index, f"call_{uuid.uuid4().hex[:24]}", name)
                self.calls.append(call)
                delta.new_calls.append(call)
            call = self.calls[index]
            if call.is_complete:
                continue
            raw, is_complete = _json_value(self.text, args_start)
            fragment = raw[len(call.arguments) :]
            if fragment:
                call.arguments = raw
                delta.arguments.append((index, fragment))
            call.is_complete = is_complete


_NAME_KEY = '{"name": "'
_ARGS_KEY = '", "arguments": '


def _call_positions(text: str) -> list[tuple[str, int]]:
    """(name, where its arguments start) for each call whose name is complete; the layout is
    fixed by the grammar: {"name": "<name>", "arguments": <value>}."""
    found: list[tuple[str, int]] = []
    position = len(_CALLS_PREFIX)
    while True:
        start = text.find(_NAME_KEY, position)
        if start < 0:
            return found
        name_start = start + len(_NAME_KEY)
        name_end = text.find('"', name_start)
        if name_end < 0:
            return found
        if not text.startswith(_ARGS_KEY, name_end):
            return found  # the separator is still arriving
        args_start = name_end + len(_ARGS_KEY)
        found.append((text[name_start:name_end], args_start))
        raw, is_complete = _json_value(text, args_start)
        if not is_complete:
            return found
        position = args_start + len(raw)


def _json_value(text: str, start: int) -> tuple[str, bool]:
    """The raw JSON value starting at text[start] (as far as it has arrived) and whether it
    is complete: strings and nested brackets are tracked, so braces inside strings count not."""
    depth, in_string, is_escaped = 0, False, False
    for offset, char in enumerate(text[start:]):
        if in_string:
            if is_escaped:
                is_escaped = False
            elif char == "\\":
                is_escaped = True
            elif char == '"':
                in_string = False
                if depth == 0:
                    return text[start : start + offset + 1], True
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return text[start : start + offset + 1], True
            if depth < 0:
                return text[start : start + offset], True  # a bare value ended by the outer }
        elif char == "," and depth == 0:
            return text[start : start + offset], True
    return text[start:], False


def _decoded_prefix(raw: str) -> str:
    """The text of a JSON string whose raw characters arrive in pieces (no closing quote yet,
    or a closing quote followed by the rest of the object)."""
    end = _string_end(raw)
    if end is not None:
        return str(json.loads(f'"{raw[:end]}"'))
    safe = raw
    if (len(safe) - len(safe.rstrip("\\"))) % 2:
        safe = safe[:-1]  # an escape that has not arrived whole
    unicode_escape = safe.rfind("\\u")
    if unicode_escape >= 0 and len(safe) - unicode_escape < 6:
        safe = safe[:unicode_escape]
    try:
        decoded = str(json.loads(f'"{safe}"'))
    except json.JSONDecodeError:
        return ""
    if decoded and "\ud800" <= decoded[-1] <= "\udbff":
        decoded = decoded[:-1]  # the first half of a surrogate pair: wait for the second
    return decoded


def _string_end(raw: str) -> int | None:
    is_escaped = False
    for index, char in enumerate(raw):
        if is_escaped:
            is_escaped = False
        elif char == "\\":
            is_escaped = True
        elif char == '"':
            return index
    return None
