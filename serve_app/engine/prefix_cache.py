"""Automatic prefix caching: the keys and values of recent requests' tokens, reused by later
requests that begin with the same tokens (a shared system prompt, the earlier turns of a chat,
which a client resends whole every turn).

Entries are indexed by a chained hash at every BLOCK_TOKENS boundary, as in vLLM's automatic
prefix caching, so a prompt that shares only the first blocks of an entry reuses those. An
entry also keeps its partial last block, and a hit goes on token by token into the entry past
its last whole block (as llama.cpp's slots reuse a prompt): a repeated prompt computes only its
last token instead of up to 8 (SmolLM2 at c=16, 4-row prefills of ~10 tokens padded to ~20
rows cost more than a 16-row decode step, docs/benchmarks.md, session 23). Blocks
are 8 tokens, not vLLM's 16 (there they are also the KV cache's pages; here only the hash
step): SmolLM2's chat template puts 24 tokens before the user's text, so a chat shares 24 of
them instead of 16 (docs/benchmarks.md, session 20). An entry
is one request's tokens (its prompt once prefilled; prompt and answer once it finished) with one
[1, heads, tokens, dim] tensor of keys and one of values per layer. Least recently used
entries go first when the token budget is full. Used by the inference thread only.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 8
# Entries sharing a prompt's last whole block that a lookup compares it with (newest first).
_MAX_HOLDERS_TRIED = 4

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, n, dim]


@dataclass(slots=True)
class PrefixHit:
    num_tokens: int  # the first num_tokens of the prompt are cached
    layers: LayerKV  # views of the entry, exactly num_tokens long


@dataclass(slots=True)
class _Entry:
    token_ids: list[int]
    layers: LayerKV
    hashes: list[int]


def block_hashes(token_ids: list[int]) -> list[int]:
    """hashes[i] stands for token_ids[: (i + 1) * BLOCK_TOKENS]; a partial last block has none."""
    hashes: list[int] = []
    previous = 0
    for end in range(BLOCK_TOKENS, len(token_ids) + 1, BLOCK_TOKENS):
        previous = hash((previous, *token_ids[end - BLOCK_TOKENS : end]))
        hashes.append(previous)
    return hashes


class PrefixCache:
    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.num_tokens = 0  # tokens held by all entries
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # least recently used first
        # block hash -> {entry id: tokens up to that block's end}, every entry holding it, the
        # newest last: dropping one entry leaves the block findable in the others.
        self._index: dict[int, dict[int, int]] = {}
        self._next_id = 0

    def lookup(self, token_ids: list[int]) -> PrefixHit | None:
        """The longest cached prefix of token_ids that leaves at least one token to compute
        (the last prompt token's logits pick the first new token)."""
        limit = len(token_ids) - 1
        for block_hash in reversed(block_hashes(token_ids[:limit])):
            best: tuple[int, int] | None = None  # (entry id, tokens it holds of this prompt)
            for entry_id, num_tokens in self._newest_holders(block_hash):
                entry = self._entries[entry_id]
                if entry.token_ids[:num_tokens] != token_ids[:num_tokens]:
                    continue  # a hash collision: never reuse another prompt's keys
                total = num_tokens + _common_length(entry.token_ids, token_ids, num_tokens, limit)
                if best is None or total > best[1]:
                    best = (entry_id, total)
            if best is None:
                continue
            entry_id, num_tokens = best
            self._entries.move_to_end(entry_id)
            layers = [
                (k[:, :, :num_tokens], v[:, :, :num_tokens])
                for k, v in self._entries[entry_id].layers
            ]
            return PrefixHit(num_tokens, layers)
        return None

    def store(self, token_ids: list[int], layers: LayerKV) -> None:
        """Keeps token_ids (at least one whole block); `layers` holds their keys/values (at
        least as many positions as token_ids, the first ones matching). The entry keeps these
        tensors, not copies: the engine passes tensors it gathered for the cache alone."""
        num_tokens = len(token_ids)
        if num_tokens < BLOCK_TOKENS or num_tokens > self.max_tokens:
            return
        token_ids = list(token_ids)
        hashes = block_hashes(token_ids)
        for entry_id, _ in self._newest_holders(hashes[-1]):
            if self._entries[entry_id].token_ids[:num_tokens] == token_ids:
                self._entries.move_to_end(entry_id)  # held already, alone or inside a longer one
                return
        self._drop_entries_covered_by(token_ids, hashes)
        while self.num_tokens + num_tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))
        kept = [(k[:, :, :num_tokens], v[:, :, :num_tokens]) for k, v in layers]
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._entries[entry_id] = _Entry(token_ids, kept, hashes)
        self.num_tokens += num_tokens
        for block, block_hash in enumerate(hashes):
            self._index.setdefault(block_hash, {})[entry_id] = (block + 1) * BLOCK_TOKENS

    def _drop_entries_covered_by(self, token_ids: list[int], hashes: list[int]) -> None:
        """A finished answer extends its own prompt's entry: the shorter one is redundant."""
        for block_hash in hashes:
            holders = self._index.get(block_hash, {})
            for entry_id, num_tokens in list(holders.items()):
                entry = self._entries[entry_id]
                length = len(entry.token_ids)
                is_last_block = num_tokens <= length < num_tokens + BLOCK_TOKENS
                if (
                    is_last_block
                    and length <= len(token_ids)
                    and entry.token_ids == token_ids[:length]
                ):
                    self._drop(entry_id)

    def _newest_holders(self, block_hash: int) -> list[tuple[int, int]]:
        """(entry id, tokens up to the block's end) of the newest entries holding the block."""
        holders = self._index.get(block_hash)
        if not holders:
            return []
        return list(itertools.islice(reversed(holders.items()), _MAX_HOLDERS_TRIED))

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.num_tokens -= len(entry.token_ids)
        for block_hash in entry.hashes:
            holders = self._index[block_hash]
            del holders[entry_id]
            if not holders:
                del self._index[block_hash]


def _common_length(held: list[int], wanted: list[int], start: int, limit: int) -> int:
    """How many tokens from `start` on (up to `limit`) `held` and `wanted` share."""
    count, end = 0, min(len(held), limit)
    while start + count < end and held[start + count] == wanted[start + count]:
        count += 1
    return count
