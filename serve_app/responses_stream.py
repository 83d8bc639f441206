"""Streamed POST /v1/responses: chat.completion.chunk dicts in, Responses SSE events out.

One `ResponsesStream` per response; the objects it sends are built by serve_app.responses_api.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from serve_app.responses_api import (
    ResponsesRequest,
    function_item,
    message_item,
    response_object,
    response_status,
    text_part,
    usage_from_chat,
)


@dataclass(slots=True)
class _Item:
    kind: Literal["message", "function_call"]
    item_id: str
    output_index: int
    text: str = ""  # the message's text or the call's arguments so far
    call_id: str = ""
    name: str = ""
    status: str = "in_progress"  # "completed" or "incomplete" once its done event is sent

    def as_dict(self, *, with_content: bool = True) -> dict[str, Any]:
        if self.kind == "message":
            text = self.text if with_content else None
            return message_item(self.item_id, text, self.status)
        return function_item(self.item_id, self.call_id, self.name, self.text, self.status)


class ResponsesStream:
    """Turns one chat stream's chunk dicts into Responses SSE event strings.

    `feed(chunk)` for each chat.completion.chunk (or `{"error": ...}`) gives the events it
    makes, `event: <type>\\ndata: <json>\\n\\n` each, numbered by `sequence_number`; the usage
    chunk after the finish chunk ends the response (`response.completed`, or
    `response.incomplete` on length). `close()` at the end of the chat stream ends a response
    still open: one cut before its finish chunk fails. After the end, nothing more is emitted.
    One output item is open at a time: a tool call's start closes the text before it.
    """

    def __init__(self, req: ResponsesRequest, response_id: str, created_at: int | None = None):
        self._req = req
        self._response_id = response_id
        self._created_at = int(time.time()) if created_at is None else created_at
        self._num_events = 0
        self._items: list[_Item] = []
        self._open: _Item | None = None
        self._calls: dict[int, _Item] = {}  # chat tool_calls index -> its output item
        self._finish_reason: str | None = None
        self._is_started = False
        self._is_ended = False

    def feed(self, chunk: dict[str, Any]) -> list[str]:
        if self._is_ended:
            return []
        if "error" in chunk:
            return self.error(chunk["error"])
        events = self._start()
        for choice in chunk.get("choices") or []:
            events += self._choice(choice)
        if chunk.get("usage") and self._finish_reason is not None:
            events += self._end(usage_from_chat(chunk["usage"]))
        return events

    def error(self, error: dict[str, Any]) -> list[str]:
        """A mid-stream failure: an `error` event, then `response.failed`."""
        if self._is_ended:
            return []
        events = self._start()
        message = str(error.get("message") or "generation failed")
        events.append(
            self._event("error", code=error.get("code"), message=message, param=error.get("param"))
        )
        failure = {"code": _failure_code(error.get("type")), "message": message}
        response = self._response("failed", None, failure)
        events.append(self._event("response.failed", response=response))
        self._is_ended = True
        return events

    def close(self) -> list[str]:
        if self._is_ended:
            return []
        if self._finish_reason is None:
            return self.error(
                {"message": "the stream ended before generation finished", "type": "server_error"}
            )
        return self._start() + self._end(None)

    def _start(self) -> list[str]:
        if self._is_started:
            return []
        self._is_started = True
        response = self._response("in_progress", None)
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def _choice(self, choice: dict[str, Any]) -> list[str]:
        delta = choice.get("delta") or {}
        events = self._text(delta["content"]) if delta.get("content") else []
        for fragment in delta.get("tool_calls") or []:
            events += self._tool_fragment(fragment)
        if choice.get("finish_reason"):
            self._finish_reason = choice["finish_reason"]
            events += self._close_open()
        return events

    def _text(self, text: str) -> list[str]:
        events: list[str] = []
        item = self._open
        if item is None or item.kind != "message":
            events += self._close_open()
            item = self._add(_Item("message", f"msg_{uuid.uuid4().hex}", len(self._items)))
            events.append(self._added(item))
            part = text_part("")
            events.append(self._event("response.content_part.added", **self._at(item), part=part))
        item.text += text
        events.append(self._event("response.output_text.delta", **self._at(item), delta=text))
        return events

    def _tool_fragment(self, fragment: dict[str, Any]) -> list[str]:
        events: list[str] = []
        function = fragment.get("function") or {}
        item = self._calls.get(fragment.get("index", 0))
        if item is None:
            events += self._close_open()
            item = self._add(_Item("function_call", f"fc_{uuid.uuid4().hex}", len(self._items)))
            item.call_id = fragment.get("id") or f"call_{uuid.uuid4().hex}"
            item.name = function.get("name") or ""
            self._calls[fragment.get("index", 0)] = item
            events.append(self._added(item))
        if function.get("arguments"):
            item.text += function["arguments"]
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.item_id,
                    output_index=item.output_index,
                    delta=function["arguments"],
                )
            )
        return events

    def _add(self, item: _Item) -> _Item:
        self._items.append(item)
        self._open = item
        return item

    def _added(self, item: _Item) -> str:
        return self._event(
            "response.output_item.added",
            output_index=item.output_index,
            item=item.as_dict(with_content=False),  # its part comes in content_part.added
        )

    def _at(self, item: _Item) -> dict[str, Any]:
        return {"item_id": item.item_id, "output_index": item.output_index, "content_index": 0}

    def _close_open(self) -> list[str]:
        item, self._open = self._open, None
        if item is None:
            return []
        item.status = "incomplete" if self._finish_reason == "length" else "completed"
        if item.kind == "message":
            events = [
                self._event(
                    "response.output_text.done", **self._at(item), text=item.text, logprobs=[]
                ),
                self._event(
                    "response.content_part.done", **self._at(item), part=text_part(item.text)
                ),
            ]
        else:
            events = [
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item.item_id,
                    output_index=item.output_index,
                    arguments=item.text,
                )
            ]
        done = self._event(
            "response.output_item.done", output_index=item.output_index, item=item.as_dict()
        )
        return [*events, done]

    def _end(self, usage: dict[str, Any] | None) -> list[str]:
        events = self._close_open()
        status = response_status(self._finish_reason)
        response = self._response(status, usage)
        events.append(self._event(f"response.{status}", response=response))
        self._is_ended = True
        return events

    def _response(
        self, status: str, usage: dict[str, Any] | None, error: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        output = [item.as_dict() for item in self._items]
        return response_object(
            self._req, self._response_id, self._created_at, status, output, usage, error
        )

    def _event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self._num_events, **fields}
        self._num_events += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


_FAILURE_CODES = {
    "rate_limit_error": "rate_limit_exceeded",
    "invalid_request_error": "invalid_prompt",
}


def _failure_code(error_type: Any) -> str:
    # ResponseError.code is an enum: our error types map onto its closest members.
    return _FAILURE_CODES.get(str(error_type), "server_error")
