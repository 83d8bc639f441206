"""Which replica of a model should take a request, so that its prompt meets its prefix cache.

Each engine caches the prompts it computed (engine/prefix_cache.py), so a chat's next turn is
cheap only on the replica that served the turn before. Serve's default router (power of two
choices) picks replicas at random: with two replicas, about half of the follow-up turns missed
their cache. `PrefixIndex` remembers, per replica, the hashes of the prompt-text blocks that
replica was sent (a chain: block i's hash covers blocks 0..i, as vLLM hashes its KV blocks), and
`rank_replicas` puts first the replicas holding the most leading blocks of a new prompt, unless
they are much busier than the least busy one. Text, not tokens: the router runs in the ingress,
before tokenization.

Ray Serve LLM's PrefixCacheAffinityRouter does this with a character tree in a detached actor,
asked with blocking calls on every request, and it needs ray[llm]'s extra packages (pyarrow);
this one is a dict per replica in the caller's own process (deployments/prefix_router.py).
"""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

BLOCK_CHARS = 64
MAX_BLOCKS = 512  # a prompt's first 32k characters decide where it goes
MAX_BLOCKS_PER_REPLICA = 100_000  # ~6.4M characters a replica, least recently sent dropped
# How many more requests than the least busy replica the one holding a prompt's prefix may have
# before the prefix gives way to load: a cached prefix saves one prefill, a queue costs every
# request in it.
DEFAULT_IMBALANCE = 4

Replica = TypeVar("Replica", bound=Hashable)


def prompt_text(call: Any) -> str:
    """The text a request's prompt starts with: its messages (each as canonical JSON, so a
    later turn, which repeats the earlier messages, starts with the same text) or its prompt
    (token ids as numbers); "" when it has neither."""
    messages = getattr(call, "messages", None)
    if messages:
        return "".join(json.dumps(m, sort_keys=True, default=str) + "\n" for m in messages)
    prompt = getattr(call, "prompt", None)
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return " ".join(str(token) for token in prompt)
    return ""


def block_hashes(text: str) -> list[int]:
    """Chained hashes of the text's whole blocks of BLOCK_CHARS (a partial last block has none:
    the next turn's text goes on past it)."""
    hashes, chained = [], 0
    whole = min(len(text) // BLOCK_CHARS, MAX_BLOCKS)
    for start in range(0, whole * BLOCK_CHARS, BLOCK_CHARS):
        chained = hash((chained, text[start : start + BLOCK_CHARS]))
        hashes.append(chained)
    return hashes


class PrefixIndex:
    """Per replica, the block hashes of the prompts it was sent (least recently sent dropped)."""

    def __init__(self, max_blocks_per_replica: int = MAX_BLOCKS_PER_REPLICA) -> None:
        self.max_blocks_per_replica = max_blocks_per_replica
        self._blocks: dict[Hashable, OrderedDict[int, None]] = {}

    def matched_blocks(self, hashes: Sequence[int], replica: Hashable) -> int:
        """How many leading blocks of a prompt `replica` was sent."""
        seen = self._blocks.get(replica)
        if not seen:
            return 0
        count = 0
        for block in hashes:
            if block not in seen:
                break
            count += 1
        return count

    def add(self, hashes: Sequence[int], replica: Hashable) -> None:
        seen = self._blocks.setdefault(replica, OrderedDict())
        for block in hashes:
            seen[block] = None
            seen.move_to_end(block)
        while len(seen) > self.max_blocks_per_replica:
            seen.popitem(last=False)

    def keep_only(self, replicas: Iterable[Hashable]) -> None:
        """Forgets replicas that are gone."""
        alive = set(replicas)
        for replica in [r for r in self._blocks if r not in alive]:
            del self._blocks[replica]

    @property
    def num_replicas(self) -> int:
        return len(self._blocks)


def rank_replicas(
    hashes: Sequence[int],
    replicas: list[Replica],
    index: PrefixIndex,
    queue_len: Callable[[Replica], int | None],
    imbalance: int = DEFAULT_IMBALANCE,
) -> list[list[Replica]]:
    """Serve's ranks of replicas for one request: those holding the most leading blocks of its
    prompt, then the rest. One rank of all (Serve takes the least busy) when there is no prompt,
    none holds any block of it, or the best holders are `imbalance` requests busier than the
    least busy replica (queue lengths Serve does not know yet count as idle). Each rank is
    shuffled: Serve takes the first of equally busy replicas, and new conversations (and calls
    without a prompt) should not all go to one."""
    if len(replicas) < 2 or not hashes:
        return [_shuffled(replicas)]
    matched = {replica: index.matched_blocks(hashes, replica) for replica in replicas}
    most = max(matched.values())
    if most == 0:
        return [_shuffled(replicas)]
    best = [replica for replica in replicas if matched[replica] == most]
    loads = {replica: queue_len(replica) or 0 for replica in replicas}
    if min(loads[r] for r in best) - min(loads.values()) >= imbalance:
        return [_shuffled(replicas)]
    rest = [replica for replica in replicas if matched[replica] != most]
    return [_shuffled(best), _shuffled(rest)] if rest else [_shuffled(best)]


def _shuffled(replicas: list[Replica]) -> list[Replica]:
    return random.sample(replicas, len(replicas))
