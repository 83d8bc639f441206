"""Reasoning split (engine option `reasoning_parser: think_tags`): the replica cuts each chat
delta into the text between `<think>` and `</think>` (`reasoning_content` on the wire) and the
rest (`content`), so the ingress's ResponseBuilder only places the two parts.

Why the replica splits, not the ingress: the option belongs to the model's own application
(config/serve.yaml), and the ingress's routing table holds only ids and kinds, so changing a
model's option restarts that model alone; the replica already sees every delta in one place
(`LLMServer._timed`, for n = 1 and each of n > 1 choices), and tools' parsing in the ingress
then sees the content only, never the reasoning.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from serve_app.engine.types import RequestOutput

ReasoningParser = Literal["think_tags"]

START_TAG = "<think>"
END_TAG = "</think>"


class ThinkTagSplitter:
    """Splits a stream of text deltas at `<think>` ... `</think>`, vLLM's `think` semantics for
    outputs that open the tag themselves.

    Text before `<think>` is content; text up to `</think>` is reasoning; everything after it
    is content (a second `<think>` stays content: one reasoning block per answer). A tag split
    across deltas is held back until it is known to be one or not, so "<thi" never reaches
    either part early. A stream that ends inside reasoning leaves it all in reasoning;
    `flush()` at the end hands back a held partial tag as the text it was.
    """

    def __init__(self) -> None:
        self._phase: Literal["before", "reasoning", "after"] = "before"
        self._pending = ""  # a possible tag's start, not yet sent

    @property
    def is_reasoning(self) -> bool:
        return self._phase == "reasoning"

    def feed(self, text: str) -> tuple[str, str]:
        """Takes the next delta; returns (reasoning_delta, content_delta) ready to send."""
        text, self._pending = self._pending + text, ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            if self._phase == "after":
                content.append(text)
                break
            tag = START_TAG if self._phase == "before" else END_TAG
            part = content if self._phase == "before" else reasoning
            at = text.find(tag)
            if at < 0:
                keep = _partial_tag_length(text, tag)
                part.append(text[: len(text) - keep])
                self._pending = text[len(text) - keep :]
                break
            part.append(text[:at])
            text = text[at + len(tag) :]
            self._phase = "reasoning" if self._phase == "before" else "after"
        return "".join(reasoning), "".join(content)

    def flush(self) -> tuple[str, str]:
        """At the end of the stream: the held-back text, as (reasoning, content)."""
        pending, self._pending = self._pending, ""
        return (pending, "") if self.is_reasoning else ("", pending)

    def split(self, output: RequestOutput) -> RequestOutput:
        """An engine delta with its text cut into `reasoning` and `text` (the content)."""
        reasoning, content = self.feed(output.text)
        if output.is_finished:
            more_reasoning, more_content = self.flush()
            reasoning, content = reasoning + more_reasoning, content + more_content
        return dataclasses.replace(output, text=content, reasoning=reasoning)


def _partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (and is shorter than it)."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:length]):
            return length
    return 0


def reasoning_splitter(parser: ReasoningParser | None) -> ThinkTagSplitter | None:
    """A fresh splitter for one choice of one generation, or None when the model has none."""
    return ThinkTagSplitter() if parser == "think_tags" else None
