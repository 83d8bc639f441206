"""Plain data that crosses the engine boundary (and Ray handles). Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True, slots=True)
class Constraint:
    """What the output must match. value: the JSON schema's text (json_schema), the regex,
    a JSON list of strings (choice), a Lark grammar (grammar); unused for json_object."""

    kind: ConstraintKind
    value: str = ""


class FinishReason(StrEnum):
    """Why a request ended. A StrEnum: it compares equal to (and serializes as) its value."""

    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # max_tokens or the context
    ABORT = "abort"  # the client went away or abort() was called
    ERROR = "error"  # the engine failed; RequestOutput.error says why

    @property
    def is_success(self) -> bool:
        return self in (FinishReason.STOP, FinishReason.LENGTH)


@dataclass(slots=True)
class SamplingParams:
    """Per-request decoding settings. temperature 0 means greedy."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # run to max_tokens (fixed-length benchmarks, deadline tests)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the top k
    constraint: Constraint | None = None  # structured output (serve_app/engine/grammar.py)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(slots=True)
class TokenLogprob:
    """One generated token with its log-probability and the most likely alternatives."""

    token_id: int
    token: str  # the token's own text
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob)


@dataclass(slots=True)
class RequestOutput:
    """What the engine hands back for one request after each step: new text since last time."""

    request_id: str
    text: str
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: FinishReason | None = None
    num_cached_prompt_tokens: int = 0  # of the prompt's tokens, taken from the prefix cache
    error: str | None = None
    queue_time_s: float = 0.0  # submit -> start of prefill
    logprobs: list[TokenLogprob] | None = None  # the tokens behind `text`, when asked for
    reasoning: str = ""  # new <think> text, cut out of `text` by the replica (reasoning.py)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_steps: int = 0
    num_prompt_tokens: int = 0  # of the requests prefilled so far
    num_cached_prompt_tokens: int = 0  # of those, taken from the prefix cache
    running_ids: list[str] = field(default_factory=list)


class GrammarError(ValueError):
    """The constraint is invalid, unsupported, or too large to compile. Here, not in grammar.py,
    so the replica's side raises and catches it without importing llguidance and torch (~1.1 s
    on a cold replica's first request, measured)."""
