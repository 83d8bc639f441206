"""Streamed POST /v1/messages: chat.completion.chunk dicts in, Anthropic SSE events out.

One `MessagesStream` per message; shapes shared with the non-streamed answer come from
serve_app.anthropic_api.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from serve_app.anthropic_api import MessagesRequest, anthropic_error, stop_reason, usage_from_chat


@dataclass(slots=True)
class _Block:
    kind: Literal["text", "tool_use"]
    index: int


class MessagesStream:
    """Turns one chat stream's chunk dicts into Anthropic Messages SSE event strings.

    `feed(chunk)` for each chat.completion.chunk (or `{"error": ...}`) gives the events it
    makes, `event: <type>\\ndata: <json>\\n\\n` each: message_start and a ping first, then
    content_block_start / content_block_delta (text_delta, input_json_delta) /
    content_block_stop, one block open at a time; the usage chunk after the finish chunk ends
    the message (message_delta with stop_reason and usage, message_stop). Token counts are
    known only at the end: message_start says 0 and message_delta carries input_tokens too.
    `close()` at the end of the chat stream ends a message still open: one cut before its
    finish chunk gets an error event. After the end, nothing more is emitted.
    """

    def __init__(self, req: MessagesRequest, message_id: str) -> None:
        self._req = req
        self._message_id = message_id
        self._num_blocks = 0
        self._open: _Block | None = None
        self._calls: dict[int, _Block] = {}  # chat tool_calls index -> its tool_use block
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
            events += self._end(chunk["usage"])
        return events

    def error(self, error: dict[str, Any]) -> list[str]:
        """A mid-stream failure: Anthropic's `error` event, and the end of the stream."""
        if self._is_ended:
            return []
        self._is_ended = True
        return [_sse("error", anthropic_error(error))]

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
        message: dict[str, Any] = {
            "id": self._message_id,
            "type": "message",
            "role": "assistant",
            "model": self._req.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_from_chat(None),
        }
        return [
            _sse("message_start", {"type": "message_start", "message": message}),
            _sse("ping", {"type": "ping"}),
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
        block = self._open
        if block is None or block.kind != "text":
            events += self._close_open()
            block = self._new_block("text")
            events.append(self._block_start(block, {"type": "text", "text": ""}))
        events.append(self._block_delta(block, {"type": "text_delta", "text": text}))
        return events

    def _tool_fragment(self, fragment: dict[str, Any]) -> list[str]:
        events: list[str] = []
        function = fragment.get("function") or {}
        block = self._calls.get(fragment.get("index", 0))
        if block is None:
            events += self._close_open()
            block = self._calls[fragment.get("index", 0)] = self._new_block("tool_use")
            tool_use: dict[str, Any] = {
                "type": "tool_use",
                "id": fragment.get("id") or f"toolu_{self._message_id}_{block.index}",
                "name": function.get("name") or "",
                "input": {},
            }
            events.append(self._block_start(block, tool_use))
        if function.get("arguments"):
            partial = {"type": "input_json_delta", "partial_json": function["arguments"]}
            events.append(self._block_delta(block, partial))
        return events

    def _new_block(self, kind: Literal["text", "tool_use"]) -> _Block:
        block = _Block(kind, self._num_blocks)
        self._num_blocks += 1
        self._open = block
        return block

    def _block_start(self, block: _Block, content_block: dict[str, Any]) -> str:
        payload = {"type": "content_block_start", "index": block.index}
        return _sse("content_block_start", {**payload, "content_block": content_block})

    def _block_delta(self, block: _Block, delta: dict[str, Any]) -> str:
        payload = {"type": "content_block_delta", "index": block.index, "delta": delta}
        return _sse("content_block_delta", payload)

    def _close_open(self) -> list[str]:
        block, self._open = self._open, None
        if block is None:
            return []
        return [_sse("content_block_stop", {"type": "content_block_stop", "index": block.index})]

    def _end(self, usage: dict[str, Any] | None) -> list[str]:
        self._is_ended = True
        delta = {"stop_reason": stop_reason(self._finish_reason), "stop_sequence": None}
        message_delta = {"type": "message_delta", "delta": delta, "usage": usage_from_chat(usage)}
        return [
            *self._close_open(),
            _sse("message_delta", message_delta),
            _sse("message_stop", {"type": "message_stop"}),
        ]


def _sse(kind: str, payload: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"
