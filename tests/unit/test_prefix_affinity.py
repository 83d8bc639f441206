"""The prefix-affinity routing of model requests (serve_app/prefix_affinity.py) and its Serve
request router (deployments/prefix_router.py), with fake replicas; the real two-replica service
is tests/integration/test_prefix_routing.py."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from deployments.prefix_router import PrefixAffinityRouter
from serve_app.engine.types import SamplingParams
from serve_app.openai_adapter import GenerateCall
from serve_app.prefix_affinity import (
    BLOCK_CHARS,
    MAX_BLOCKS,
    PrefixIndex,
    block_hashes,
    prompt_text,
    rank_replicas,
)

SYSTEM = {"role": "system", "content": "You answer questions about dragons. " * 4}


def turn(*contents: str) -> list[dict[str, Any]]:
    """A chat's messages: the system message, then user and assistant turns alternating."""
    roles = ["user", "assistant"]
    return [SYSTEM] + [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]


def chat(*contents: str) -> GenerateCall:
    return GenerateCall("chat-1", "chat", SamplingParams(), messages=turn(*contents))


def completion(prompt: str | list[int]) -> GenerateCall:
    return GenerateCall("cmpl-1", "completions", SamplingParams(), prompt=prompt)


def idle(_replica: Any) -> int:
    return 0


def test_a_later_turn_starts_with_the_earlier_turns_text() -> None:
    first = prompt_text(chat("Where do dragons live?"))
    later = prompt_text(chat("Where do dragons live?", "In caves.", "Why?"))
    assert later.startswith(first) and len(later) > len(first)
    hashes_first, hashes_later = block_hashes(first), block_hashes(later)
    assert hashes_first and hashes_later[: len(hashes_first)] == hashes_first


def test_prompt_text_of_completions_and_of_other_calls() -> None:
    assert prompt_text(completion("Once upon")) == "Once upon"
    assert prompt_text(completion([1, 22, 333])) == "1 22 333"
    assert prompt_text(["an", "embedding", "input"]) == ""
    assert prompt_text(None) == ""


def test_block_hashes_are_chained_whole_blocks_up_to_the_cap() -> None:
    block = "x" * BLOCK_CHARS
    assert block_hashes(block[:-1]) == []  # no whole block: nothing to match on
    hashes = block_hashes(block * 2 + "partial")
    assert len(hashes) == 2 and hashes[0] != hashes[1]  # same text, other position
    assert block_hashes("y" * BLOCK_CHARS + block)[1] != hashes[1]  # the chain: what came before
    assert len(block_hashes(block * (MAX_BLOCKS + 10))) == MAX_BLOCKS


def test_the_replica_holding_the_prefix_is_ranked_first() -> None:
    index = PrefixIndex()
    conversation = block_hashes("a" * BLOCK_CHARS * 4)
    index.add(conversation[:3], "r2")  # r2 served the earlier turn
    index.add(conversation[:1], "r1")  # r1 only shares the first block
    for _ in range(20):  # whatever the shuffle
        ranks = rank_replicas(conversation, ["r1", "r2", "r3"], index, idle)
        assert ranks[0] == ["r2"] and sorted(ranks[1]) == ["r1", "r3"]


def test_a_prompt_nobody_holds_goes_to_all_in_shuffled_order() -> None:
    index = PrefixIndex()
    index.add(block_hashes("b" * BLOCK_CHARS * 2), "r1")
    firsts = set()
    for _ in range(50):
        ranks = rank_replicas(block_hashes("c" * BLOCK_CHARS * 2), ["r1", "r2"], index, idle)
        assert len(ranks) == 1 and sorted(ranks[0]) == ["r1", "r2"]
        firsts.add(ranks[0][0])
    assert firsts == {"r1", "r2"}  # Serve takes the first of equally busy ones


def test_a_busy_holder_gives_way_to_load() -> None:
    index = PrefixIndex()
    hashes = block_hashes("d" * BLOCK_CHARS * 2)
    index.add(hashes, "r1")
    loads = {"r1": 5, "r2": 2}
    assert rank_replicas(hashes, ["r1", "r2"], index, loads.get, imbalance=4)[0] == ["r1"]
    loads["r1"] = 6
    ranks = rank_replicas(hashes, ["r1", "r2"], index, loads.get, imbalance=4)
    assert len(ranks) == 1 and sorted(ranks[0]) == ["r1", "r2"]
    unknown: dict[str, int | None] = {"r1": None, "r2": None}  # not probed yet: idle
    assert rank_replicas(hashes, ["r1", "r2"], index, unknown.get)[0] == ["r1"]


def test_index_drops_least_recent_blocks_and_gone_replicas() -> None:
    index = PrefixIndex(max_blocks_per_replica=4)
    old, new = block_hashes("e" * BLOCK_CHARS * 3), block_hashes("f" * BLOCK_CHARS * 3)
    index.add(old, "r1")
    index.add(new, "r1")
    assert index.matched_blocks(new, "r1") == 3
    assert index.matched_blocks(old, "r1") == 0  # its first two blocks were dropped
    index.add(old, "r2")
    index.keep_only(["r2"])
    assert index.num_replicas == 1 and index.matched_blocks(new, "r1") == 0


# ---- the Serve router, on fake replicas ------------------------------------------------------


@dataclass(frozen=True)
class FakeReplica:
    replica_id: str


@dataclass
class FakePending:
    args: list[Any]


def fake_router(replica_ids: list[str]) -> PrefixAffinityRouter:
    """The router's own state only (Serve's constructor wants a live deployment)."""
    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)
    router.initialize_state(imbalance=4)
    router._use_replica_queue_len_cache = False
    router._replicas = {replica_id: FakeReplica(replica_id) for replica_id in replica_ids}  # type: ignore[misc]
    return router


def test_router_sends_the_next_turn_where_the_first_went() -> None:
    router = fake_router(["r1", "r2"])
    replicas = list(router._replicas.values())
    first = FakePending([chat("Tell me a long story.")])
    ranks = asyncio.run(router.choose_replicas(replicas, first))  # type: ignore[arg-type]
    assert len(ranks) == 1  # nobody holds it: Serve takes the least busy
    chosen = ranks[0][0]
    router.on_request_routed(first, chosen.replica_id, None)  # type: ignore[arg-type]

    later = FakePending([chat("Tell me a long story.", "Once upon a time...", "Go on.")])
    for _ in range(10):
        ranks = asyncio.run(router.choose_replicas(replicas, later))  # type: ignore[arg-type]
        assert ranks[0] == [chosen]

    assert asyncio.run(router.choose_replicas(replicas[:1], later)) == [replicas[:1]]  # type: ignore[arg-type]

    stats_call = FakePending([])  # stats(), info(): no prompt, any replica
    firsts = set()
    for _ in range(50):
        ranks = asyncio.run(router.choose_replicas(replicas, stats_call))  # type: ignore[arg-type]
        assert len(ranks) == 1 and sorted(r.replica_id for r in ranks[0]) == ["r1", "r2"]
        firsts.add(ranks[0][0].replica_id)
    assert firsts == {"r1", "r2"}


def test_router_forgets_replicas_that_are_gone() -> None:
    router = fake_router(["r1", "r2"])
    for number, replica_id in enumerate(["r1", "r2"]):
        pending = FakePending([chat(f"{number}" * 200)])
        router.on_request_routed(pending, replica_id, None)  # type: ignore[arg-type]
    assert router._index.num_replicas == 2
    del router._replicas["r2"]  # type: ignore[attr-defined]
    pending = FakePending([chat("3" * 200)])
    router.on_request_routed(pending, "r1", None)  # type: ignore[arg-type]
    assert router._index.num_replicas == 1
