"""Ingress side: engine deltas of one generation (every choice) -> OpenAI chunks and bodies.

One `ResponseBuilder` per response keeps a `ChoiceState` per choice: its text, logprobs,
finish reason, and with tools the parser that turns the model's JSON answer into content
and `tool_calls` (serve_app/tool_calls.py), so raw tool markup never reaches `content`.
The replica has already cut `<think>` text out into `RequestOutput.reasoning` (serve_app/
reasoning.py); it goes out as `reasoning_content`, vLLM's extension, in deltas and the message.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from serve_app.engine.types import RequestOutput, TokenLogprob
from serve_app.protocol import PromptTokensDetails, Usage
from serve_app.response_types import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    FunctionCallOut,
    TokenLogprobEntry,
    ToolCallOut,
    TopLogprob,
    dumped,
)
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
        self.reasoning_parts: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.tool_parser = ToolOutputParser() if has_tools else None
        self.finish_reason: str | None = None
        self.num_generated = 0
        self.num_cached_prompt_tokens = 0
        self.error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, output: RequestOutput) -> ToolDelta | None:
        self.parts.append(output.text)
        self.reasoning_parts.append(output.reasoning)
        self.logprobs.extend(output.logprobs or [])
        self.num_generated = output.num_generated_tokens
        self.num_cached_prompt_tokens = max(
            self.num_cached_prompt_tokens, output.num_cached_prompt_tokens
        )
        if output.finish_reason is not None:
            self.finish_reason = str(output.finish_reason)
            self.error = output.error
        return self.tool_parser.feed(output.text) if self.tool_parser else None

    @property
    def reasoning(self) -> str | None:
        return "".join(self.reasoning_parts) or None

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
            role = ChatDelta(role="assistant", content="")
            return [self._chat_envelope([_chunk_choice(c.index, role)]) for c in self.choices]
        if self.echo_text:
            return [
                self._completion_envelope([_completion_choice(c.index, self.echo_text)])
                for c in self.choices
            ]
        return []

    def usage_chunk(self) -> dict[str, Any]:
        if self.ids.endpoint == "chat":
            return self._chat_envelope([], usage=self.usage())
        return self._completion_envelope([], usage=self.usage())

    def _chat_chunk(
        self, choice: ChoiceState, output: RequestOutput, tool_delta: ToolDelta | None
    ) -> dict[str, Any] | None:
        delta = ChatDelta()
        if output.reasoning:
            delta.reasoning_content = output.reasoning
        if tool_delta is None:
            if output.text:
                delta.content = output.text
        else:
            if tool_delta.content:
                delta.content = tool_delta.content
            calls = _tool_call_deltas(tool_delta)
            if calls:
                delta.tool_calls = calls
        reason = choice.api_finish_reason if output.finish_reason else None
        logprobs = self._chat_logprobs(output.logprobs or [])
        if not delta.model_fields_set and reason is None and logprobs is None:
            return None
        return self._chat_envelope([_chunk_choice(choice.index, delta, logprobs, reason)])

    def _completion_chunk(
        self, choice: ChoiceState, output: RequestOutput
    ) -> dict[str, Any] | None:
        reason = choice.api_finish_reason if output.finish_reason else None
        if not output.text and reason is None and not output.logprobs:
            return None
        offset = len(choice.text) - len(output.text)
        logprobs = self._completion_logprobs(output.logprobs or [], offset)
        return self._completion_envelope(
            [_completion_choice(choice.index, output.text, logprobs, reason)]
        )

    # ---- the whole response ------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        if self.ids.endpoint != "chat":
            choices = [self._final_completion_choice(choice) for choice in self.choices]
            return self._completion_envelope(choices, usage=self.usage())
        body = ChatCompletionResponse(
            id=self.ids.response_id,
            object="chat.completion",
            created=self.ids.created,
            model=self.ids.model,
            choices=[self._final_chat_choice(choice) for choice in self.choices],
            usage=self.usage(),
        )
        return dumped(body)

    def _final_chat_choice(self, choice: ChoiceState) -> ChatChoice:
        message = AssistantMessage(role="assistant", content=choice.content)
        if choice.reasoning is not None:
            message.reasoning_content = choice.reasoning
        if choice.tool_calls:
            message.tool_calls = [_tool_call(call) for call in choice.tool_calls]
        return ChatChoice(
            index=choice.index,
            message=message,
            logprobs=self._chat_logprobs(choice.logprobs),
            finish_reason=choice.api_finish_reason,
        )

    def _final_completion_choice(self, choice: ChoiceState) -> CompletionChoice:
        logprobs = self._completion_logprobs(choice.logprobs, len(self.echo_text))
        return _completion_choice(choice.index, choice.text, logprobs, choice.api_finish_reason)

    def usage(self) -> Usage:
        # The choices share one prompt: its cached part is counted once, as the prompt is.
        cached = max(choice.num_cached_prompt_tokens for choice in self.choices)
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=self.num_completion_tokens,
            total_tokens=self.num_prompt_tokens + self.num_completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    # ---- logprobs and envelopes --------------------------------------------------------

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> ChatLogprobs | None:
        if not self.has_logprobs or not entries:
            return None
        return ChatLogprobs(content=[_chat_logprob(entry) for entry in entries], refusal=None)

    def _completion_logprobs(
        self, entries: list[TokenLogprob], offset: int
    ) -> CompletionLogprobs | None:
        if not self.has_logprobs:
            return None
        offsets = []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.token)
        return CompletionLogprobs(
            tokens=[entry.token for entry in entries],
            token_logprobs=[_finite(entry.logprob) for entry in entries],
            top_logprobs=[{t: _finite(lp) for _, t, lp in entry.top} for entry in entries],
            text_offset=offsets,
        )

    def _chat_envelope(
        self, choices: list[ChatChunkChoice], usage: Usage | None = None
    ) -> dict[str, Any]:
        chunk = ChatCompletionChunk(
            id=self.ids.response_id,
            object="chat.completion.chunk",
            created=self.ids.created,
            model=self.ids.model,
            choices=choices,
        )
        if usage is not None:
            chunk.usage = usage
        return dumped(chunk)

    def _completion_envelope(
        self, choices: list[CompletionChoice], usage: Usage | None = None
    ) -> dict[str, Any]:
        body = CompletionResponse(
            id=self.ids.response_id,
            object="text_completion",
            created=self.ids.created,
            model=self.ids.model,
            choices=choices,
        )
        if usage is not None:
            body.usage = usage
        return dumped(body)


def _chunk_choice(
    index: int, delta: ChatDelta, logprobs: ChatLogprobs | None = None, reason: str | None = None
) -> ChatChunkChoice:
    return ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=reason)


def _completion_choice(
    index: int, text: str, logprobs: CompletionLogprobs | None = None, reason: str | None = None
) -> CompletionChoice:
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=reason)


def _tool_call_deltas(tool_delta: ToolDelta) -> list[ToolCallOut]:
    calls = [
        ToolCallOut(
            index=call.index,
            id=call.id,
            type="function",
            function=FunctionCallOut(name=call.name, arguments=""),
        )
        for call in tool_delta.new_calls
    ]
    calls += [
        ToolCallOut(index=index, function=FunctionCallOut(arguments=fragment))
        for index, fragment in tool_delta.arguments
    ]
    return calls


def _tool_call(call: ParsedCall) -> ToolCallOut:
    function = FunctionCallOut(name=call.name, arguments=call.arguments)
    return ToolCallOut(id=call.id, type="function", function=function)


def _chat_logprob(entry: TokenLogprob) -> TokenLogprobEntry:
    return TokenLogprobEntry(
        **_token_fields(entry.token, entry.logprob),
        top_logprobs=[TopLogprob(**_token_fields(t, lp)) for _, t, lp in entry.top],
    )


def _token_fields(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _finite(logprob), "bytes": list(token.encode("utf-8"))}


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _MIN_LOGPROB


def usage(num_prompt: int, num_completion: int) -> dict[str, int]:
    """The usage object's fields (the embeddings route's too)."""
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
    }
