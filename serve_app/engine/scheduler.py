"""Which requests run in the next engine iteration: admission, the prefill budget, aborts.

Each iteration prefills at most `max_prefill_tokens` prompt tokens, then every running row
decodes one token. Short prompts that arrived together share one left-padded forward (padded
size counts against the budget), at most `max_prefill_rows` of them: a burst of requests then
gets its first tokens a group at a time, most of them sooner than after one forward of all
(docs/benchmarks.md, session 22: 16 at once, groups of 4: TTFT p50 0.75x, 0.97x the tokens).
A prompt longer than the budget is prefilled a chunk per
iteration (chunked prefill), holding a batch slot meanwhile, so running streams keep decoding.
No torch here: the engine looks prefixes up and runs the forwards.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serve_app.engine.sequence import Sequence, SequenceStatus

PrefixLookup = Callable[[Sequence], None]  # sets seq.num_cached (and its cached keys/values)


@dataclass(slots=True)
class Chunk:
    """Prompt tokens [start, end) of a long prompt, fed in this iteration."""

    seq: Sequence
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == self.seq.num_prompt_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """This iteration's prefill work: a group sharing one forward, or one chunk (or nothing)."""

    group: list[Sequence] = field(default_factory=list)
    chunk: Chunk | None = None


class Scheduler:
    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_prefill_tokens: int,
        lookup_prefix: PrefixLookup,
        max_prefill_rows: int | None = None,
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens  # prefill tokens per iteration (padded)
        self.max_prefill_rows = max_prefill_rows or max_num_seqs  # distinct prompts per forward
        self._lookup_prefix = lookup_prefix
        self.requests: dict[str, Sequence] = {}  # every request not yet freed, by id
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in batch row order
        self.chunked: Sequence | None = None  # mid chunked prefill; holds a batch slot
        self.num_prompt_tokens = 0  # of the requests admitted so far
        self.num_cached_prompt_tokens = 0  # of those, found in the prefix cache

    @property
    def has_requests(self) -> bool:
        return bool(self.requests)

    def add(self, seq: Sequence) -> None:
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> None:
        seq = self.requests.get(request_id)
        if seq is not None and not seq.is_finished:
            seq.status = SequenceStatus.ABORTED

    def take_aborted(self) -> list[Sequence]:
        """Aborted requests whose final output is still to be made; waiting and chunked ones
        leave their places now, running ones keep their rows until `free_finished`."""
        aborted = [
            seq
            for seq in self.requests.values()
            if seq.status is SequenceStatus.ABORTED and not seq.is_finished
        ]
        if aborted:
            self.waiting = deque(s for s in self.waiting if s.status is not SequenceStatus.ABORTED)
            if self.chunked is not None and self.chunked.status is SequenceStatus.ABORTED:
                self.chunked = None
        return aborted

    def schedule(self) -> SchedulerOutput:
        """This iteration's prefill: the next chunk of a long prompt, or the waiting requests
        that fit together in one left-padded forward of at most max_prefill_tokens."""
        if self.chunked is not None:
            return SchedulerOutput(chunk=self._next_chunk(self.chunked))
        group: list[Sequence] = []
        prompts: set[tuple[int, ...]] = set()  # identical prompts are computed once (n > 1)
        while self.waiting and len(self.running) + len(group) < self.max_num_seqs:
            head = self.waiting[0]
            self._lookup_once(head)
            if head.num_to_compute > self.max_prefill_tokens:  # too long for one iteration
                if group:
                    break  # its chunks start next iteration
                self.chunked = self._admit(self.waiting.popleft())
                return SchedulerOutput(chunk=self._next_chunk(self.chunked))
            key = (head.num_computed, *head.prompt_ids)
            num_rows = len(prompts) + (key not in prompts)
            longest = max(seq.num_to_compute for seq in [head, *group])
            if group and longest * num_rows > self.max_prefill_tokens:
                break
            if num_rows > self.max_prefill_rows:
                break
            prompts.add(key)
            group.append(self._admit(self.waiting.popleft()))
        return SchedulerOutput(group=group)

    def start_running(self, seqs: list[Sequence]) -> None:
        """Prefilled sequences become the last rows of the batch, in this order."""
        for seq in seqs:
            seq.num_computed = seq.num_prompt_tokens
            if not seq.is_finished and seq.status is SequenceStatus.PREFILLING:
                seq.status = SequenceStatus.RUNNING
        self.running.extend(seqs)

    def free_finished(self) -> list[int]:
        """Forgets finished rows; returns the batch rows that stay, in their new order (to
        free the others' KV): the last rows move into the freed places, so few rows move."""
        keep = rows_after_leaving([not seq.is_finished for seq in self.running])
        if len(keep) < len(self.running):
            self.running = [self.running[row] for row in keep]
        for request_id in [i for i, seq in self.requests.items() if seq.is_finished]:
            del self.requests[request_id]
        return keep

    def clear(self) -> list[Sequence]:
        """Drops every request (after a failed step); returns those not finished yet."""
        unfinished = [seq for seq in self.requests.values() if not seq.is_finished]
        self.requests, self.waiting, self.running, self.chunked = {}, deque(), [], None
        return unfinished

    def _lookup_once(self, seq: Sequence) -> None:
        if seq.num_cached is None:  # looked up when it first heads the queue
            self._lookup_prefix(seq)
            seq.num_computed = seq.num_cached or 0

    def _admit(self, seq: Sequence) -> Sequence:
        seq.status = SequenceStatus.PREFILLING
        seq.queue_time_s = time.monotonic() - seq.submitted_at
        self.num_prompt_tokens += seq.num_prompt_tokens
        self.num_cached_prompt_tokens += seq.num_cached or 0
        return seq

    def _next_chunk(self, seq: Sequence) -> Chunk:
        start = seq.num_computed
        end = min(start + self.max_prefill_tokens, seq.num_prompt_tokens)
        seq.num_computed = end
        if end == seq.num_prompt_tokens:
            self.chunked = None  # it joins the running batch after this chunk
        return Chunk(seq, start, end)


def rows_after_leaving(stays: list[bool]) -> list[int]:
    """The batch rows that stay, as the new order: row j is old row result[j]. A staying row
    among the first len(result) keeps its place; the freed places there take the staying rows
    after them, in order. So result[j] >= j, and only as many rows move as places were freed
    below the new row count."""
    staying = [row for row, stays_here in enumerate(stays) if stays_here]
    count = len(staying)
    movers = iter(row for row in staying if row >= count)
    return [row if stays[row] else next(movers) for row in range(count)]
