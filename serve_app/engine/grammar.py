"""Constrained decoding with llguidance: a grammar per row, its token mask applied to the
batch's logits before sampling, its state advanced by each sampled token.

`GrammarCompiler` turns a `Constraint` (JSON schema, any JSON, regex, choice, Lark grammar)
into a validated grammar, cached by content; the replica calls it in a worker thread with a
time limit, never on the inference thread. Each request then gets its own `RowGrammar` (a
copy of the compiled matcher). Why llguidance: docs/architecture.md (measured against
xgrammar in benchmarks/grammar_choice.py).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import torch

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

from serve_app.engine.types import Constraint, GrammarError

_MAX_CACHED_GRAMMARS = 256
# Resource limits for one grammar (llguidance's units): a pathological schema fails to compile
# (an error the client sees) instead of running for minutes.
_LIMITS = llguidance.LLParserLimits(max_grammar_size=200_000, verbose_errors=False)
_BIT_INDEX = torch.arange(32, dtype=torch.int32)
# JSON laid out as json.dumps does (", " and ": ", no other whitespace): free whitespace lets a
# weak model pad with spaces and newlines until max_tokens (seen with the test model).
_JSON_LAYOUT: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class CompiledGrammar:
    """A validated grammar; `new_row()` gives each request a matcher of its own."""

    __slots__ = ("_prototype",)

    def __init__(self, prototype: llguidance.LLMatcher) -> None:
        self._prototype = prototype

    def new_row(self) -> RowGrammar:
        return RowGrammar(self._prototype.deep_copy())


class RowGrammar:
    """One request's grammar state."""

    __slots__ = ("_matcher",)

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill_mask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the allowed next tokens into bitmask[row] (int32 words, 1 bit per token)."""
        words = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def consume(self, token_id: int) -> None:
        self._matcher.consume_token(token_id)

    @property
    def is_done(self) -> bool:
        """The grammar is complete and admits no further token."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return str(self._matcher.get_error()) if self._matcher.is_error() else None


class GrammarCompiler:
    """Grammars for one model's tokenizer, compiled once per distinct constraint."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: set[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._ll_tokenizer: llguidance.LLTokenizer | None = None  # built on first use (~1 s)
        self._cache: OrderedDict[Constraint, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()  # compiles run in worker threads

    def start_warming(self) -> None:
        """Builds llguidance's view of the tokenizer now, in a thread of its own (about 0.5 s
        idle, seconds on a busy machine), so the first constrained request does not pay it."""
        threading.Thread(target=self._warm, name="grammar-warm", daemon=True).start()

    @property
    def is_warm(self) -> bool:
        return self._ll_tokenizer is not None

    def _warm(self) -> None:
        with self._lock:
            self._llg_tokenizer()

    def compile(self, constraint: Constraint) -> CompiledGrammar:
        """Blocking; raises GrammarError with a message fit for the client."""
        with self._lock:
            cached = self._cache.get(constraint)
            if cached is not None:
                self._cache.move_to_end(constraint)
                return cached
            tokenizer = self._llg_tokenizer()
        compiled = CompiledGrammar(self._matcher(tokenizer, constraint))
        with self._lock:
            self._cache[constraint] = compiled
            while len(self._cache) > _MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            eos = self._eos_token_ids or None
            self._ll_tokenizer = _llg_tokenizer_of(self._tokenizer, self._vocab_size, eos)
        return self._ll_tokenizer

    def _matcher(
        self, tokenizer: llguidance.LLTokenizer, constraint: Constraint
    ) -> llguidance.LLMatcher:
        grammar = _grammar_text(constraint)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=_LIMITS)
        if matcher.is_error():
            raise GrammarError(f"invalid {constraint.kind}: {_short(matcher.get_error())}")
        return matcher


def _llg_tokenizer_of(
    tokenizer: Any, vocab_size: int, eos: list[int] | None
) -> llguidance.LLTokenizer:
    """llguidance.hf.from_tokenizer copies the Rust tokenizer (a JSON round trip) to turn off
    padding and truncation on the copy; ours has neither, so its JSON goes to llguidance as it
    is: Gemma-3's 262k-token view in 3.7 s instead of 5.5, holding the GIL all along (the
    engine's step loop waits meanwhile)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.padding is not None or backend.truncation is not None:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
    if eos is None:
        eos = tokenizer.eos_token_id
    return llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos)


def _grammar_text(constraint: Constraint) -> str:
    """llguidance's grammar for a constraint."""
    kind, value = constraint.kind, constraint.value
    try:
        if kind == "json_schema":
            return _json_grammar(value)
        if kind == "json_object":
            return _json_grammar({"type": "object"})
        if kind == "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(value))
        if kind == "choice":
            choices = json.loads(value)
            return str(llguidance.LLMatcher.grammar_from_regex("|".join(map(re.escape, choices))))
        if kind == "grammar":
            return str(llguidance.LLMatcher.grammar_from_lark(value))
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"invalid {kind}: {_short(str(exc))}") from exc
    raise GrammarError(f"unknown constraint kind {kind!r}")


def _json_grammar(schema: str | dict[str, Any]) -> str:
    return str(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_LAYOUT))


def _short(message: str) -> str:
    return message if len(message) <= 500 else message[:500] + "..."


def apply_grammar_masks(logits: torch.Tensor, grammars: list[RowGrammar | None]) -> None:
    """Sets the logits of tokens a row's grammar forbids to -inf (rows without one untouched)."""
    rows = [row for row, grammar in enumerate(grammars) if grammar is not None]
    if not rows:
        return
    vocab = int(logits.shape[1])
    bitmask = torch.full((len(rows), (vocab + 31) // 32), -1, dtype=torch.int32)
    for index, row in enumerate(rows):
        grammar = grammars[row]
        assert grammar is not None  # rows lists only rows with a grammar
        grammar.fill_mask(bitmask, index)
    allowed = ((bitmask.unsqueeze(-1) >> _BIT_INDEX) & 1).flatten(1)[:, :vocab].bool()
    index_tensor = torch.tensor(rows, device=logits.device)
    constrained = logits.index_select(0, index_tensor)
    constrained.masked_fill_(~allowed.to(logits.device), float("-inf"))
    logits.index_copy_(0, index_tensor, constrained)
