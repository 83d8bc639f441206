"""Token ids -> text deltas, safe for multi-byte UTF-8, with stop strings held back and cut."""

from __future__ import annotations

from typing import Any

# How many prompt tokens to keep as decoding context, so that tokenizers which drop a
# leading space when decoding a lone token (SentencePiece) still produce it.
_NUM_CONTEXT_TOKENS = 6
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing id list and returns only the text that is final.

    A token that ends inside a multi-byte character decodes to U+FFFD; such text is held back
    until the following token completes the character (the offsets trick used by vLLM/TGI).
    """

    __slots__ = ("_tokenizer", "_token_ids", "_prefix_offset", "_read_offset")

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._token_ids = list(prompt_token_ids[-_NUM_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)

    def push(self, token_id: int) -> str:
        self._token_ids.append(token_id)
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._token_ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end), for the last output."""
        prefix_text = self._decode(self._token_ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._token_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._token_ids)
        return full_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        return str(self._tokenizer.decode(token_ids, skip_special_tokens=True))


class StopStringMatcher:
    """Holds back the tail that could still become a stop string; cuts the text at a match."""

    __slots__ = ("_stops", "_max_hold", "_pending")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            emitted, self._pending = self._pending[:cut], ""
            return emitted, True
        split = len(self._pending) - self._max_hold
        if split <= 0:
            return "", False
        emitted, self._pending = self._pending[:split], self._pending[split:]
        return emitted, False

    def flush(self) -> str:
        """Releases what was held back when generation ends for another reason."""
        emitted, self._pending = self._pending, ""
        return emitted
