"""The model, its KV cache and the forward passes: prefill, chunked prefill, decode, sampling.

Rows of the running batch keep the scheduler's order (`BatchCache` row i is `running[i]`).
With `prefix_cache_tokens`, a prompt that starts like a recent request's tokens
(prefix_cache.py) is prefilled from those tokens' cached keys and values: only the rest is
computed. This is the one place a faster runner (another kernel, another device) plugs in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from serve_app.engine.batch import BatchCache, cache_kv, growing_cache, left_padded_rows
from serve_app.engine.grammar import apply_grammar_masks
from serve_app.engine.llama_decode import LlamaDecodeStep, supports_llama_decode
from serve_app.engine.prefix_cache import BLOCK_TOKENS, LayerKV, PrefixCache
from serve_app.engine.q4_native import (
    idle_pool_workers,
    keep_torch_on_one_thread,
    set_threads,
    torch_threads_of_pool,
)
from serve_app.engine.quantized_linear import has_int4_layers
from serve_app.engine.sampling import Sampled, sample
from serve_app.engine.sequence import Sequence
from serve_app.engine.thread_governor import ThreadGovernor, govern_decoder_layers

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _ChunkCache:
    """The own cache of the one prompt being prefilled in chunks."""

    request_id: str
    cache: DynamicCache


class ModelRunner:
    def __init__(self, model: Any, *, prefix_cache_tokens: int = 0) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        if prefix_cache_tokens and _has_sliding_window(model):
            # A cached prefix leaves padding between it and the rest of a prompt in a batch;
            # sliding-window masks count columns, so that padding would narrow the window.
            logger.warning("prefix caching is off: this model has sliding-window attention")
            prefix_cache_tokens = 0
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        # The decode step written out for Llama-family models on native 4-bit weights
        # (llama_decode.py: 1.4-1.7x faster per step than transformers' forward there); float32
        # models keep the model's forward (no clear gain measured there).
        self.llama_decode = (
            LlamaDecodeStep(model)
            if self.device.type == "cpu" and supports_llama_decode(model) and has_int4_layers(model)
            else None
        )
        self.batch = BatchCache()
        self._chunk: _ChunkCache | None = None
        # Made on the first decode, in the inference thread: torch's thread count is per thread
        # (OpenMP), and Ray's OMP_NUM_THREADS=1 leaves other threads seeing one.
        self.governor: ThreadGovernor | None = None
        self._has_governor = False

    # ---- prefix cache ------------------------------------------------------------------

    def lookup_prefix(self, seq: Sequence) -> None:
        """Finds the cached start of seq's prompt (sets seq.num_cached and seq.prefix)."""
        hit = self.prefix_cache.lookup(seq.prompt_ids) if self.prefix_cache else None
        seq.prefix = hit
        seq.num_cached = hit.num_tokens if hit else 0

    def remember_answer(self, row: int, seq: Sequence) -> None:
        """Caches prompt + answer of a finished row (a chat's next turn starts with them). The
        last token was sampled but never fed, so the cache holds all but that one."""
        if self.prefix_cache is None or self.batch.cache is None:
            return
        mask = self.batch.attention_mask
        assert mask is not None  # a batch with a cache has a mask
        layers = [(k[row : row + 1], v[row : row + 1]) for k, v in cache_kv(self.batch.cache)]
        token_ids = seq.prompt_ids + seq.output_ids[:-1]
        self._remember(token_ids, layers, mask[row].nonzero().squeeze(1))

    def _remember(self, token_ids: list[int], layers: LayerKV, columns: torch.Tensor) -> None:
        """Caches token_ids' keys/values, found at `columns` of `layers` (one row each)."""
        if self.prefix_cache is None or len(token_ids) < BLOCK_TOKENS:
            return
        columns = columns[: len(token_ids)]  # gathered once: the cache keeps these copies
        kept = [(k.index_select(2, columns), v.index_select(2, columns)) for k, v in layers]
        self.prefix_cache.store(token_ids, kept)

    def _remember_prompts(self, seqs: list[Sequence], cache: DynamicCache, mask: Any) -> None:
        """Caches each row's prompt from a batch cache whose mask marks the real columns."""
        if self.prefix_cache is None:
            return
        layers = cache_kv(cache)
        for row, seq in enumerate(seqs):
            if seq.num_prompt_tokens - 1 <= (seq.num_cached or 0):
                continue  # all but its last token came from the cache: nothing worth adding
            row_layers = [(k[row : row + 1], v[row : row + 1]) for k, v in layers]
            self._remember(seq.prompt_ids, row_layers, mask[row].nonzero().squeeze(1))

    # ---- forward passes ----------------------------------------------------------------

    def prefill(self, group: list[Sequence]) -> Sampled:
        """One left-padded forward for the group; its rows join the batch. Rows with a cached
        prefix feed only the rest of their prompt after it: columns [cached prefixes,
        left-padded][rests, left-padded]. Identical prompts (n > 1 choices of one request)
        are computed once and their row copied. Returns each row's first token."""
        distinct, rows_of = _distinct_prompts(group)
        cache, mask, logits = self._forward_prompts(distinct)
        if len(distinct) < len(group):
            index = torch.tensor(rows_of, device=self.device)
            layers = [
                (k.index_select(0, index), v.index_select(0, index)) for k, v in cache_kv(cache)
            ]
            cache, mask, logits = growing_cache(layers), mask[index], logits[index]
        return self._join_batch(group, cache, mask, logits)

    def _forward_prompts(
        self, group: list[Sequence]
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """The group's prompts in one forward: their cache, its mask, the last logits."""
        cached = [seq.num_cached or 0 for seq in group]
        input_ids, rest_mask = self._left_padded(
            [seq.prompt_ids[n:] for seq, n in zip(group, cached, strict=True)]
        )
        offsets = torch.tensor(cached, device=self.device).unsqueeze(1)
        position_ids = (rest_mask.cumsum(dim=1) - 1).clamp(min=0) + offsets
        cache, mask = DynamicCache(), rest_mask
        if max(cached):
            cache, prefix_mask = self._cached_prefixes(group, cached)
            mask = torch.cat([prefix_mask, rest_mask], dim=1)
        if self.llama_decode is not None and self.llama_decode.in_c:
            # decode_kernel.c: a few tokens cost ~40 ms in transformers' forward, ~10 here
            if not max(cached):
                cache = self.llama_decode.empty_cache(len(group))
            logits = self.llama_decode.prefill(input_ids, position_ids, mask, cache)
        else:
            logits = self._model_logits(input_ids, mask, position_ids, cache)
        self._remember_prompts(group, cache, mask)
        return cache, mask, logits

    def prefill_chunk(self, seq: Sequence, start: int, end: int) -> Sampled | None:
        """Feeds prompt tokens [start, end) of a long prompt into its own cache; on the last
        chunk the row joins the batch and its first token is returned."""
        if self._chunk is None or self._chunk.request_id != seq.request_id:
            self._chunk = _ChunkCache(seq.request_id, self._chunk_start_cache(seq))
        cache = self._chunk.cache
        logits = self._model_logits(
            torch.tensor([seq.prompt_ids[start:end]], device=self.device),
            torch.ones((1, end), dtype=torch.long, device=self.device),
            torch.arange(start, end, device=self.device).unsqueeze(0),
            cache,
        )
        logger.debug("prefill chunk %d-%d of %d tokens", start, end, seq.num_prompt_tokens)
        if end < seq.num_prompt_tokens:
            return None
        self._chunk = None
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        self._remember_prompts([seq], cache, mask)
        return self._join_batch([seq], cache, mask, logits)

    def decode(self, rows: list[Sequence]) -> Sampled:
        """One step for every running row (in batch order); returns each row's next token."""
        input_ids = torch.tensor([[seq.last_token] for seq in rows], device=self.device)
        positions = [seq.num_prompt_tokens + seq.num_generated - 1 for seq in rows]
        position_ids = torch.tensor(positions, device=self.device).unsqueeze(1)
        if not self._has_governor:
            self.governor = _thread_governor(self.model, self.device, self.llama_decode)
            if self.device.type == "cpu" and _steps_on_idle_workers(self.llama_decode):
                keep_torch_on_one_thread()
            self._has_governor = True
        if self.governor is not None:
            self.governor.start_step(len(rows))
        try:
            logits = self._decode_logits(input_ids, position_ids)
        finally:
            if self.governor is not None:
                self.governor.end_step()
        return _sample(logits, rows)

    def _decode_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        mask, cache = self.batch.decode_mask(), self.batch.cache
        assert cache is not None  # rows are decoding
        if self.llama_decode is not None:
            on_layer = self.governor.layer_done if self.governor is not None else None
            return self.llama_decode(input_ids, position_ids, mask, cache, on_layer)
        return self._model_logits(input_ids, mask, position_ids, cache)

    def _model_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        """The model's own forward after `cache` (which it extends): the last token's logits.
        Its attention is torch's: on every thread the pool has."""
        with torch_threads_of_pool():
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :]

    # ---- batch rows --------------------------------------------------------------------

    def keep_rows(self, rows: list[int]) -> None:
        """Frees the KV memory of every batch row not listed."""
        self.batch.keep_rows(rows)

    def release(self, seq: Sequence) -> None:
        """Drops the partial cache of an aborted request that was prefilling in chunks."""
        if self._chunk is not None and self._chunk.request_id == seq.request_id:
            self._chunk = None

    def reset(self) -> None:
        """Forgets the batch and any chunk (after a failed step)."""
        self.batch, self._chunk = BatchCache(), None

    # ---- helpers -----------------------------------------------------------------------

    def _join_batch(
        self, group: list[Sequence], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor
    ) -> Sampled:
        for seq in group:  # prefilled: its views must not keep an evicted entry alive
            seq.prefix = None
        self.batch.append_rows(cache, mask)
        return _sample(logits, group)

    def _cached_prefixes(
        self, group: list[Sequence], cached: list[int]
    ) -> tuple[DynamicCache, torch.Tensor]:
        """A cache holding each row's cached prefix, left-padded to the longest, and its mask."""
        width = max(cached)
        prefixes = [seq.prefix.layers if seq.prefix else None for seq in group]
        cache = growing_cache(left_padded_rows(prefixes, width))
        mask = torch.zeros((len(group), width), dtype=torch.long, device=self.device)
        for row, num in enumerate(cached):
            mask[row, width - num :] = 1
        return cache, mask

    def _chunk_start_cache(self, seq: Sequence) -> DynamicCache:
        """A long prompt's own cache, starting after its cached prefix if it has one."""
        return growing_cache(seq.prefix.layers) if seq.prefix else DynamicCache()

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), length), dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt) :] = torch.tensor(prompt)
            mask[row, length - len(prompt) :] = 1
        return ids.to(self.device), mask.to(self.device)


def _thread_governor(
    model: Any, device: torch.device, llama_decode: LlamaDecodeStep | None
) -> ThreadGovernor | None:
    """One thread while the CPU is contended (thread_governor.py); None on GPU, on one thread,
    or where every decode step runs on work_pool.c's SCHED_IDLE workers, which give way to
    other processes by themselves (its loops never wait for a worker that did)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2:
        return None
    if _steps_on_idle_workers(llama_decode):
        return None
    governor = ThreadGovernor(threads, set_threads)
    return governor if govern_decoder_layers(model, governor) else None


def _steps_on_idle_workers(llama_decode: LlamaDecodeStep | None) -> bool:
    """Whether every decode step runs on work_pool.c's SCHED_IDLE workers (all of it C calls)."""
    return llama_decode is not None and llama_decode.layers_on_work_pool and idle_pool_workers()


def _sample(logits: torch.Tensor, rows: list[Sequence]) -> Sampled:
    """Each row's next token, within its grammar if it has one."""
    grammars = [seq.grammar for seq in rows]
    if any(grammars):
        apply_grammar_masks(logits, grammars)
    return sample(logits, [seq.sampler for seq in rows])


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


def _distinct_prompts(group: list[Sequence]) -> tuple[list[Sequence], list[int]]:
    """The group's distinct prompts (first of each), and each row's index among them."""
    first_of: dict[tuple[int, ...], int] = {}
    distinct: list[Sequence] = []
    rows_of = []
    for seq in group:
        key = (seq.num_cached or 0, *seq.prompt_ids)
        if key not in first_of:
            first_of[key] = len(distinct)
            distinct.append(seq)
        rows_of.append(first_of[key])
    return distinct, rows_of


def _has_sliding_window(model: Any) -> bool:
    return getattr(model.config.get_text_config(), "sliding_window", None) is not None
