"""One request's state inside the engine: a Sequence with one status, from queue to finish.

The scheduler moves a sequence WAITING -> PREFILLING -> RUNNING -> FINISHED; an abort marks it
ABORTED at once (the engine frees it before the next step). Imports no torch: the scheduler,
which works on sequences only, stays torch-free.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serve_app.engine.types import FinishReason, RequestOutput, TokenLogprob

if TYPE_CHECKING:  # torch types, named in annotations only
    from serve_app.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
    from serve_app.engine.grammar import RowGrammar
    from serve_app.engine.prefix_cache import PrefixHit
    from serve_app.engine.sampling import SamplerState

OutputSink = Callable[[RequestOutput], None]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, not yet admitted
    PREFILLING = "prefilling"  # admitted, its prompt in a forward pass (or in chunks)
    RUNNING = "running"  # a row of the decoding batch
    FINISHED = "finished"  # ended: stop, length or error; its final output is sent
    ABORTED = "aborted"  # abort requested or done; freed before the next step


@dataclass(slots=True)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampler: SamplerState
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    sink: OutputSink
    submitted_at: float = 0.0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None  # set once, when its final output is made
    queue_time_s: float = 0.0
    num_computed: int = 0  # prompt tokens whose keys/values are computed (or cached)
    num_generated: int = 0
    num_streamed: int = 0  # num_generated when text was last sent
    unsent_text: str = ""  # held for the next chunk (stream_interval > 1)
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)  # of the held tokens
    last_token: int = -1
    output_ids: list[int] = field(default_factory=list)
    num_cached: int | None = None  # prompt tokens found in the prefix cache; None: not looked up
    prefix: PrefixHit | None = None  # those tokens' cached keys/values until prefilled
    grammar: RowGrammar | None = None  # its structured-output state, if constrained

    @property
    def is_finished(self) -> bool:
        """Its final output is made (it may still hold a batch row until the next compaction)."""
        return self.finish_reason is not None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_to_compute(self) -> int:
        """Prompt tokens that still need a forward pass (the prefix lookup must have run)."""
        return self.num_prompt_tokens - self.num_computed
