"""Continuous-batching generation: one inference thread owns the model; asyncio gets the tokens.

Requests join the running batch between decode steps (after a prefill) and leave as soon as
they finish or are aborted, so a new request never waits for the batch in flight. Each engine
iteration prefills at most `max_prefill_tokens` tokens, then runs one decode step: short prompts
that arrived together share one left-padded forward, and a longer prompt is prefilled in chunks
over several iterations (chunked prefill), so the running streams keep getting tokens meanwhile.
With `prefix_cache_tokens`, a prompt that starts like a recent request's tokens (prefix_cache.py)
is prefilled from those tokens' cached keys and values: only the rest is computed.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from serve_app.engine.batch import BatchCache, cache_kv, growing_cache, left_padded_rows
from serve_app.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from serve_app.engine.prefix_cache import BLOCK_TOKENS, LayerKV, PrefixCache, PrefixHit
from serve_app.engine.sampling import SamplerState, sample_next_tokens
from serve_app.engine.types import EngineStats, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

OutputSink = Callable[[RequestOutput], None]


@dataclass(slots=True)
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampler: SamplerState
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    sink: OutputSink
    submitted_at: float = 0.0
    queue_time_s: float = 0.0
    num_generated: int = 0
    num_streamed: int = 0  # num_generated when text was last sent
    unsent_text: str = ""  # held for the next chunk (stream_interval > 1)
    last_token: int = -1
    output_ids: list[int] = field(default_factory=list)
    prefix: PrefixHit | None = None  # cached keys/values of its first prompt tokens
    is_prefix_looked_up: bool = False
    is_abort_requested: bool = False
    is_done: bool = False


@dataclass(slots=True)
class _ChunkedPrefill:
    """A prompt longer than one iteration's prefill budget, prefilled a chunk per iteration."""

    seq: _Sequence
    cache: DynamicCache
    num_done: int = 0  # prompt tokens already in `cache`


def _load_libc() -> Any:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _load_libc()


def release_free_memory() -> None:
    """Gives the freed KV cache back to the OS once the batch drains (glibc keeps it otherwise:
    measured: SmolLM2 engine +306 MB resident after a 32-stream burst, none with this)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class LLMEngine:
    """Generates for many requests at once on one model.

    Contract: `generate()` yields RequestOutput deltas for one request; the last one has a
    finish_reason. Closing or cancelling the iterator (or calling `abort`) removes the request
    from the batch before the next decode step and frees its KV memory.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_num_seqs: int,
        max_model_len: int,
        eos_token_ids: set[int],
        max_prefill_tokens: int = 256,
        stream_interval: int = 1,
        prefix_cache_tokens: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.max_prefill_tokens = max_prefill_tokens  # prefill tokens per iteration (padded)
        self.stream_interval = stream_interval  # tokens per streamed chunk after the first
        if prefix_cache_tokens and _has_sliding_window(model):
            # A cached prefix leaves padding between it and the rest of a prompt in a batch;
            # sliding-window masks count columns, so that padding would narrow the window.
            logger.warning("prefix caching is off: this model has sliding-window attention")
            prefix_cache_tokens = 0
        self._prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self.device = next(model.parameters()).device
        self._vocab_size = int(model.config.get_text_config().vocab_size)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._chunked: _ChunkedPrefill | None = None  # holds a batch slot while it prefills
        self._prefilling: list[_Sequence] = []  # out of the queue, not yet in the batch
        self._finals: list[tuple[_Sequence, RequestOutput]] = []  # sent once their row is freed
        self._batch = BatchCache()
        self._stats = EngineStats()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._is_stopping = False
        self.last_step_at = time.monotonic()

    # ---- public API (any thread) -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._is_stopping = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def is_stuck(self, max_step_seconds: float) -> bool:
        """True when work is pending and the loop has not come round for that long (a hung step)."""
        return self.is_busy and time.monotonic() - self.last_step_at > max_step_seconds

    @property
    def is_busy(self) -> bool:
        return bool(self._running or self._waiting or self._chunked)

    def submit(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: OutputSink
    ) -> None:
        max_tokens = params.max_tokens or (self.max_model_len - len(prompt_ids))
        seq = _Sequence(
            request_id=request_id,
            prompt_ids=prompt_ids,
            max_tokens=max(1, min(max_tokens, self.max_model_len - len(prompt_ids))),
            sampler=SamplerState(params, self._vocab_size, self.device),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            stop_matcher=StopStringMatcher(params.stop),
            sink=sink,
            submitted_at=time.monotonic(),
        )
        self._inbox.put(("add", seq))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(output: RequestOutput) -> None:
            if not loop.is_closed():  # a consumer whose loop is gone has nobody to tell
                loop.call_soon_threadsafe(outputs.put_nowait, output)

        self.submit(request_id, prompt_ids, params, sink)
        is_finished = False
        try:
            while not is_finished:
                output = await outputs.get()
                is_finished = output.is_finished
                yield output
        finally:
            if not is_finished:  # consumer went away (client disconnect, cancel)
                self.abort(request_id)

    def stats(self) -> EngineStats:
        stats = self._stats
        chunked = self._chunked  # read once: the inference thread may clear it meanwhile
        admitted = [*self._running, *([chunked.seq] if chunked else [])]
        return EngineStats(
            num_running=len(admitted),
            num_waiting=len(self._waiting),
            num_finished=stats.num_finished,
            num_aborted=stats.num_aborted,
            num_steps=stats.num_steps,
            num_prompt_tokens=stats.num_prompt_tokens,
            num_cached_prompt_tokens=stats.num_cached_prompt_tokens,
            running_ids=[seq.request_id for seq in admitted],
        )

    # ---- inference thread --------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._is_stopping:
                self._drain_inbox(block=not self.is_busy)
                self.last_step_at = time.monotonic()
                was_busy = self.is_busy
                try:
                    self._prefill_next()
                    if self._running:
                        self._decode_step()
                except Exception as exc:  # a failed step fails its requests, not the replica
                    logger.exception("engine step failed")
                    self._fail_all(f"engine error: {exc}")
                if was_busy and not self.is_busy:
                    release_free_memory()
        finally:
            # Whatever ended the loop, nobody in flight is left waiting for a token.
            self._fail_all("the inference thread stopped")

    def _drain_inbox(self, block: bool) -> None:
        try:
            command, arg = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle_command(command, arg)
            try:
                command, arg = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._remove_aborted()

    def _handle_command(self, command: str, arg: Any) -> None:
        if command == "add":
            self._waiting.append(arg)
        elif command == "abort":
            for seq in self._admitted_or_waiting():
                if seq.request_id == arg:
                    seq.is_abort_requested = True

    def _admitted_or_waiting(self) -> list[_Sequence]:
        chunked = [self._chunked.seq] if self._chunked else []
        return [*self._waiting, *self._prefilling, *chunked, *self._running]

    def _remove_aborted(self) -> None:
        for seq in [s for s in self._waiting if s.is_abort_requested]:
            self._waiting.remove(seq)
            self._finish(seq, "abort", "")
        if self._chunked and self._chunked.seq.is_abort_requested:
            seq, self._chunked = self._chunked.seq, None  # its partial KV is simply dropped
            self._finish(seq, "abort", "")
        for seq in self._running:
            if seq.is_abort_requested and not seq.is_done:
                self._finish(seq, "abort", "")
        self._compact()

    def _prefill_next(self) -> None:
        """This iteration's prefill, at most max_prefill_tokens: the next chunk of a long prompt,
        or the waiting requests that fit together in one left-padded forward."""
        if self._chunked is not None:
            self._prefill_chunk(self._chunked)
            return
        group: list[_Sequence] = []
        num_padded_tokens = 0
        while self._waiting and len(self._running) + len(group) < self.max_num_seqs:
            head_len = self._num_to_compute(self._waiting[0])
            if head_len > self.max_prefill_tokens:  # too long for one iteration
                if group:
                    break  # its chunks start next iteration
                seq = self._waiting.popleft()
                self._started(seq)
                self._chunked = self._chunked_prefill(seq)
                self._prefill_chunk(self._chunked)
                return
            longest = max([head_len, *(self._num_to_compute(s) for s in group)])
            if group and longest * (len(group) + 1) > self.max_prefill_tokens:
                break
            group.append(self._waiting.popleft())
            num_padded_tokens = longest * len(group)
        if group:
            logger.debug("prefill %d requests (%d padded tokens)", len(group), num_padded_tokens)
            self._prefilling = group  # if the forward fails, _fail_all still finds them
            self._prefill(group)
            self._prefilling = []

    def _started(self, seq: _Sequence) -> None:
        seq.queue_time_s = time.monotonic() - seq.submitted_at
        self._stats.num_prompt_tokens += len(seq.prompt_ids)
        self._stats.num_cached_prompt_tokens += _num_cached(seq)

    # ---- prefix cache ------------------------------------------------------------------

    def _prefix_of(self, seq: _Sequence) -> PrefixHit | None:
        """The cached start of this prompt, looked up once (when it first heads the queue)."""
        if self._prefix_cache is not None and not seq.is_prefix_looked_up:
            seq.prefix = self._prefix_cache.lookup(seq.prompt_ids)
            seq.is_prefix_looked_up = True
        return seq.prefix

    def _num_to_compute(self, seq: _Sequence) -> int:
        """Prompt tokens this request still needs a forward pass for."""
        self._prefix_of(seq)
        return len(seq.prompt_ids) - _num_cached(seq)

    def _remember(self, token_ids: list[int], layers: LayerKV, columns: torch.Tensor) -> None:
        """Caches token_ids' keys/values, found at `columns` of `layers` (one row each)."""
        if self._prefix_cache is None:
            return
        num_full = len(token_ids) // BLOCK_TOKENS * BLOCK_TOKENS
        if num_full == 0:
            return
        columns = columns[:num_full]  # gathered once: the cache keeps these copies
        kept = [(k.index_select(2, columns), v.index_select(2, columns)) for k, v in layers]
        self._prefix_cache.store(token_ids[:num_full], kept)

    def _remember_rows(
        self, seqs: list[_Sequence], token_lists: list[list[int]], cache: DynamicCache, mask: Any
    ) -> None:
        """Caches each row's tokens from a batch cache whose mask marks the real columns."""
        if self._prefix_cache is None:
            return
        layers = cache_kv(cache)
        for row, (seq, token_ids) in enumerate(zip(seqs, token_lists, strict=True)):
            if len(token_ids) // BLOCK_TOKENS * BLOCK_TOKENS <= _num_cached(seq):
                continue  # nothing new: what it could add is what it was given
            row_layers = [(k[row : row + 1], v[row : row + 1]) for k, v in layers]
            self._remember(token_ids, row_layers, mask[row].nonzero().squeeze(1))

    # ---- prefill -----------------------------------------------------------------------

    def _prefill(self, group: list[_Sequence]) -> None:
        """One left-padded forward for the group. Rows with a cached prefix feed only the rest
        of their prompt after it: columns [cached prefixes, left-padded][rests, left-padded]."""
        for seq in group:
            self._started(seq)
        cached = [_num_cached(seq) for seq in group]
        input_ids, rest_mask = self._left_padded(
            [seq.prompt_ids[n:] for seq, n in zip(group, cached, strict=True)]
        )
        offsets = torch.tensor(cached, device=self.device).unsqueeze(1)
        position_ids = (rest_mask.cumsum(dim=1) - 1).clamp(min=0) + offsets
        new_cache, mask = DynamicCache(), rest_mask
        if max(cached):
            width = max(cached)
            prefixes = [seq.prefix.layers if seq.prefix else None for seq in group]
            new_cache = growing_cache(left_padded_rows(prefixes, width))
            prefix_mask = torch.zeros((len(group), width), dtype=torch.long, device=self.device)
            for row, num in enumerate(cached):
                prefix_mask[row, width - num :] = 1
            mask = torch.cat([prefix_mask, rest_mask], dim=1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=new_cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._remember_rows(group, [seq.prompt_ids for seq in group], new_cache, mask)
        self._start_decoding(group, new_cache, mask, out.logits[:, -1, :])

    def _release_prefixes(self, group: list[_Sequence]) -> None:
        for seq in group:  # prefilled: its views must not keep an evicted entry alive
            if seq.prefix is not None:
                seq.prefix.layers = []

    def _chunked_prefill(self, seq: _Sequence) -> _ChunkedPrefill:
        """A long prompt's own cache, starting after its cached prefix if it has one."""
        if seq.prefix is None:
            return _ChunkedPrefill(seq, DynamicCache())
        cache = growing_cache(seq.prefix.layers)
        return _ChunkedPrefill(seq, cache, num_done=seq.prefix.num_tokens)

    def _prefill_chunk(self, chunked: _ChunkedPrefill) -> None:
        """Feeds the next max_prefill_tokens of a long prompt; on the last chunk the row joins
        the running batch with its first token."""
        prompt = chunked.seq.prompt_ids
        start, end = chunked.num_done, min(chunked.num_done + self.max_prefill_tokens, len(prompt))
        out = self.model(
            input_ids=torch.tensor([prompt[start:end]], device=self.device),
            attention_mask=torch.ones((1, end), dtype=torch.long, device=self.device),
            position_ids=torch.arange(start, end, device=self.device).unsqueeze(0),
            past_key_values=chunked.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        chunked.num_done = end
        logger.debug("prefill chunk %d-%d of %d tokens", start, end, len(prompt))
        if end == len(prompt):
            self._chunked = None
            mask = torch.ones((1, end), dtype=torch.long, device=self.device)
            self._remember_rows([chunked.seq], [prompt], chunked.cache, mask)
            self._start_decoding([chunked.seq], chunked.cache, mask, out.logits[:, -1, :])

    def _start_decoding(
        self,
        group: list[_Sequence],
        cache: DynamicCache,
        mask: torch.Tensor,
        last_logits: torch.Tensor,
    ) -> None:
        """Prefilled rows join the running batch and take their first token."""
        self._release_prefixes(group)
        self._batch.append_rows(cache, mask)
        self._running.extend(group)
        next_ids = sample_next_tokens(last_logits, [seq.sampler for seq in group])
        num_finished = sum(self._advance(s, t) for s, t in zip(group, next_ids, strict=True))
        if num_finished:
            self._compact()

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), length), dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt) :] = torch.tensor(prompt)
            mask[row, length - len(prompt) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _decode_step(self) -> None:
        rows = self._running
        input_ids = torch.tensor([[seq.last_token] for seq in rows], device=self.device)
        positions = [len(seq.prompt_ids) + seq.num_generated - 1 for seq in rows]
        position_ids = torch.tensor(positions, device=self.device).unsqueeze(1)
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._batch.decode_mask(),
            position_ids=position_ids,
            past_key_values=self._batch.cache,
            use_cache=True,
        )
        self._stats.num_steps += 1
        next_ids = sample_next_tokens(out.logits[:, -1, :], [seq.sampler for seq in rows])
        num_finished = sum(self._advance(seq, tok) for seq, tok in zip(rows, next_ids, strict=True))
        if num_finished:
            self._compact()

    def _advance(self, seq: _Sequence, token_id: int) -> bool:
        """Takes one new token for a sequence; emits its text. Returns True when it finished."""
        seq.num_generated += 1
        seq.last_token = token_id
        seq.output_ids.append(token_id)
        seq.sampler.record(token_id)
        if token_id in self.eos_token_ids and not seq.sampler.params.ignore_eos:
            return self._finish(seq, "stop", seq.stop_matcher.flush())
        delta = seq.detokenizer.push(token_id)
        is_length = seq.num_generated >= seq.max_tokens
        if is_length:
            delta += seq.detokenizer.flush()
        text, hit_stop = seq.stop_matcher.feed(delta)
        if hit_stop:
            return self._finish(seq, "stop", text)
        if is_length:
            return self._finish(seq, "length", text + seq.stop_matcher.flush())
        seq.unsent_text += text
        if seq.unsent_text and (
            seq.num_streamed == 0 or seq.num_generated - seq.num_streamed >= self.stream_interval
        ):  # the first text goes at once (time to first token), then every stream_interval
            seq.sink(self._output(seq, seq.unsent_text, None))
            seq.unsent_text, seq.num_streamed = "", seq.num_generated
        return False

    def _finish(self, seq: _Sequence, reason: str, text: str, error: str | None = None) -> bool:
        if reason in ("stop", "length"):  # a running row: its answer can seed the next turn
            self._remember_answer(seq)
        seq.is_done = True  # _compact removes the row
        text, seq.unsent_text = seq.unsent_text + text, ""
        if reason == "abort":
            self._stats.num_aborted += 1
        else:
            self._stats.num_finished += 1
        self._finals.append((seq, self._output(seq, text, reason, error)))
        return True

    def _output(
        self, seq: _Sequence, text: str, reason: str | None, error: str | None = None
    ) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            text=text,
            num_prompt_tokens=len(seq.prompt_ids),
            num_generated_tokens=seq.num_generated,
            finish_reason=reason,
            error=error,
            queue_time_s=seq.queue_time_s,
        )

    def _remember_answer(self, seq: _Sequence) -> None:
        """Caches prompt + answer of a finished row (a chat's next turn starts with them). The
        last token was sampled but never fed, so the cache holds all but that one."""
        if self._prefix_cache is None or self._batch.cache is None:
            return
        row = self._running.index(seq)
        token_ids = seq.prompt_ids + seq.output_ids[:-1]
        mask = self._batch.attention_mask
        assert mask is not None
        rows = cache_kv(self._batch.cache)
        layers = [(k[row : row + 1], v[row : row + 1]) for k, v in rows]
        self._remember(token_ids, layers, mask[row].nonzero().squeeze(1))

    def _compact(self) -> None:
        """Frees finished rows' KV memory, then sends their final outputs."""
        keep = [i for i, seq in enumerate(self._running) if not seq.is_done]
        if len(keep) < len(self._running):
            self._running = [self._running[i] for i in keep]
            self._batch.keep_rows(keep)
        finals, self._finals = self._finals, []
        for seq, output in finals:
            seq.sink(output)

    def _fail_all(self, message: str) -> None:
        for seq in self._admitted_or_waiting():
            if not seq.is_done:
                self._finish(seq, "error", "", error=message)
        self._waiting.clear()
        self._chunked, self._prefilling = None, []
        self._running = []
        self._batch = BatchCache()
        self._compact()


def _num_cached(seq: _Sequence) -> int:
    return seq.prefix.num_tokens if seq.prefix else 0


def _has_sliding_window(model: Any) -> bool:
    return getattr(model.config.get_text_config(), "sliding_window", None) is not None
