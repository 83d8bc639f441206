"""Ingress side: engine deltas of one generation (every choice) -> OpenAI chunks and bodies.

One `ResponseBuilder` per response keeps a `ChoiceState` per choice: its text, logprobs,
finish reason, and with tools the parser that turns the model's JSON answer into content
and `tool_calls` (serve_app/tool_calls.py), so raw tool markup never reaches `content`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from serve_app.engine.types import RequestOutput, TokenLogprob
from serve_app.tool_calls import ParsedCall, ToolDelta, ToolOutputParser

Endpoint = Literal["chat", "completions"]
_MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI sends this for impossible tokens


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

    @property
    def object_name(self) -> str:
        return "chat.completion.chunk" if self.endpoint == "chat" else "text_completion"


class ChoiceState:
    """One choice as it streams: what was sent, what it adds up to."""

    def __init__(self, index: int, has_tools: bool, echo_text: str) -> None:
        self.index = index
        self.parts: list[str] = [echo_text] if echo_text else []
        self.logprobs: list[TokenLogprob] = []
        self.tool_parser = ToolOutputParser() if has_tools else None
        self.finish_reason: str | None = None
        self.num_generated = 0
        self.error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, output: RequestOutput) -> ToolDelta | None:
        self.parts.append(output.text)
        self.logprobs.extend(output.logprobs or [])
        self.num_generated = output.num_generated_tokens
        if output.finish_reason is not None:
            self.finish_reason = str(output.finish_reason)
            self.error = output.error
        return self.tool_parser.feed(output.text) if self.tool_parser else None

    @property
    def tool_calls(self) -> list[ParsedCall]:
        return self.tool_parser.complete_calls if self.tool_parser else []

    @property
    def api_finish_reason(self) -> str | None:
        if self.finish_reason == "stop" and self.tool_calls:
            return "tool_calls"
        return self.finish_reason

    @property
    def content(self) -> str | None:
        if self.tool_parser is None:
            return self.text
        return self.tool_parser.content  # None when the model called tools


class ResponseBuilder:
    def __init__(
        self,
        ids: ResponseIds,
        num_prompt_tokens: int,
        num_choices: int = 1,
        *,
        has_tools: bool = False,
        echo_text: str = "",
        has_logprobs: bool = False,
    ) -> None:
        self.ids = ids
        self.num_prompt_tokens = num_prompt_tokens
        self.has_logprobs = has_logprobs
        self.echo_text = echo_text
        self.choices = [ChoiceState(i, has_tools, echo_text) for i in range(num_choices)]

    # ---- progress ----------------------------------------------------------------------

    def add(self, index: int, output: RequestOutput) -> dict[str, Any] | None:
        """Takes one engine delta of choice `index`; returns the chunk to stream, if any."""
        choice = self.choices[index]
        tool_delta = choice.add(output)
        if output.finish_reason in ("error", "abort"):
            return None
        if self.ids.endpoint == "chat":
            return self._chat_chunk(choice, output, tool_delta)
        return self._completion_chunk(choice, output)

    @property
    def is_finished(self) -> bool:
        return all(choice.finish_reason is not None for choice in self.choices)

    @property
    def failure(self) -> str | None:
        """Why the generation failed, if any choice ended with an error or was aborted."""
        for choice in self.choices:
            if choice.finish_reason in ("error", "abort"):
                return choice.error or "generation ended without a result"
        return None

    @property
    def num_completion_tokens(self) -> int:
        return sum(choice.num_generated for choice in self.choices)

    # ---- streamed chunks ---------------------------------------------------------------

    def first_chunks(self) -> list[dict[str, Any]]:
        """Chat: each choice's role; completions with echo: each choice's prompt text."""
        if self.ids.endpoint == "chat":
            return [
                self._envelope([_choice(c.index, delta={"role": "assistant", "content": ""})])
                for c in self.choices
            ]
        if self.echo_text:
            return [self._envelope([_choice(c.index, text=self.echo_text)]) for c in self.choices]
        return []

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._envelope([]), "usage": self.usage()}

    def _chat_chunk(
        self, choice: ChoiceState, output: RequestOutput, tool_delta: ToolDelta | None
    ) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        if tool_delta is None:
            if output.text:
                delta["content"] = output.text
        else:
            if tool_delta.content:
                delta["content"] = tool_delta.content
            calls = _tool_call_deltas(tool_delta)
            if calls:
                delta["tool_calls"] = calls
        reason = choice.api_finish_reason if output.finish_reason else None
        logprobs = self._chat_logprobs(output.logprobs or [])
        if not delta and reason is None and logprobs is None:
            return None
        return self._envelope(
            [_choice(choice.index, delta=delta, logprobs=logprobs, reason=reason)]
        )

    def _completion_chunk(
        self, choice: ChoiceState, output: RequestOutput
    ) -> dict[str, Any] | None:
        reason = choice.api_finish_reason if output.finish_reason else None
        if not output.text and reason is None and not output.logprobs:
            return None
        offset = len(choice.text) - len(output.text)
        logprobs = self._completion_logprobs(output.logprobs or [], offset)
        return self._envelope(
            [_choice(choice.index, text=output.text, logprobs=logprobs, reason=reason)]
        )

    # ---- the whole response ------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        choices = [self._final_choice(choice) for choice in self.choices]
        obj = "chat.completion" if self.ids.endpoint == "chat" else "text_completion"
        return {**self._envelope(choices), "object": obj, "usage": self.usage()}

    def _final_choice(self, choice: ChoiceState) -> dict[str, Any]:
        reason = choice.api_finish_reason
        if self.ids.endpoint != "chat":
            logprobs = self._completion_logprobs(choice.logprobs, len(self.echo_text))
            return _choice(choice.index, text=choice.text, logprobs=logprobs, reason=reason)
        message: dict[str, Any] = {"role": "assistant", "content": choice.content}
        if choice.tool_calls:
            message["tool_calls"] = [_tool_call(call) for call in choice.tool_calls]
        logprobs = self._chat_logprobs(choice.logprobs)
        return _choice(choice.index, message=message, logprobs=logprobs, reason=reason)

    def usage(self) -> dict[str, int]:
        return usage(self.num_prompt_tokens, self.num_completion_tokens)

    # ---- logprobs ----------------------------------------------------------------------

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.has_logprobs or not entries:
            return None
        return {"content": [_chat_logprob(entry) for entry in entries], "refusal": None}

    def _completion_logprobs(
        self, entries: list[TokenLogprob], offset: int
    ) -> dict[str, Any] | None:
        if not self.has_logprobs:
            return None
        offsets = []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.token)
        return {
            "tokens": [entry.token for entry in entries],
            "token_logprobs": [_finite(entry.logprob) for entry in entries],
            "top_logprobs": [{t: _finite(lp) for _, t, lp in entry.top} for entry in entries],
            "text_offset": offsets,
        }

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.ids.response_id,
            "object": self.ids.object_name,
            "created": self.ids.created,
            "model": self.ids.model,
            "choices": choices,
        }


def _choice(
    index: int, *, reason: str | None = None, logprobs: Any = None, **body: Any
) -> dict[str, Any]:
    return {"index": index, **body, "logprobs": logprobs, "finish_reason": reason}


def _tool_call_deltas(tool_delta: ToolDelta) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = [
        {
            "index": call.index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        for call in tool_delta.new_calls
    ]
    calls += [
        {"index": index, "function": {"arguments": fragment}}
        for index, fragment in tool_delta.arguments
    ]
    return calls


def _tool_call(call: ParsedCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _chat_logprob(entry: TokenLogprob) -> dict[str, Any]:
    return {
        **_token_entry(entry.token, entry.logprob),
        "top_logprobs": [_token_entry(token, logprob) for _, token, logprob in entry.top],
    }


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _MIN_LOGPROB


def usage(num_prompt: int, num_completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
    }
