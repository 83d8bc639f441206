"""Serve's request router for the model deployments: a chat's next turn goes to the replica
that holds its prompt's prefix (serve_app/prefix_affinity.py), within a load bound.

It runs where the handle is, in the ingress: each ingress replica keeps its own index of what
it sent where (no shared state, no extra calls per request). Not Serve's FIFOMixin: a replica
chosen for one prompt must take that request, not whichever is first in the queue.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from serve_app.prefix_affinity import (
    DEFAULT_IMBALANCE,
    PrefixIndex,
    block_hashes,
    prompt_text,
    rank_replicas,
)

# A model's `deployment: request_router_config:` that picks this router (opt-in for now: with
# it as the default, a saturation test of the ingress flaked in CI twice; docs/benchmarks.md).
PREFIX_ROUTER_CONFIG = {"request_router_class": "deployments.prefix_router:PrefixAffinityRouter"}


class PrefixAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, **kwargs: Any) -> None:
        self._index = PrefixIndex()
        self._imbalance = imbalance

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if len(candidate_replicas) < 2:  # nothing to choose: no hashing on the shipped config
            return [candidate_replicas]
        hashes = _prompt_hashes(pending_request)
        by_id = {replica.replica_id: replica for replica in candidate_replicas}
        ranks = rank_replicas(hashes, list(by_id), self._index, self._queue_len, self._imbalance)
        return [[by_id[replica_id] for replica_id in rank] for rank in ranks]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        if self._index.num_replicas > len(self._replicas):
            self._index.keep_only(self._replicas)
        # One replica: nothing to remember (a second one learns from the requests after it).
        hashes = _prompt_hashes(pending_request) if len(self._replicas) > 1 else []
        if hashes:
            self._index.add(hashes, replica_id)

    def _queue_len(self, replica_id: ReplicaID) -> int | None:
        if not self._use_replica_queue_len_cache:
            return None
        return self._replica_queue_len_cache.get(replica_id)


def _prompt_hashes(pending_request: PendingRequest | None) -> list[int]:
    """The block hashes of a generation's prompt (the GenerateCall the ingress sent); none for
    other calls (stats, info, embeddings)."""
    if pending_request is None or not pending_request.args:
        return []
    return block_hashes(prompt_text(pending_request.args[0]))
