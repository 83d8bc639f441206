"""The embedding model's deployment: Ray Serve's @serve.batch groups concurrent inputs, up to
the model's `engine.max_batch_size` per forward pass."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ray import serve

from deployments.model_replica import ModelReplica
from serve_app.errors import APIError, InvalidRequestError
from serve_app.openai_adapter import Rejected

if TYPE_CHECKING:
    from serve_app.engine.embedding import EmbeddingEngine  # noqa: F401 (the base class names it)

logger = logging.getLogger(__name__)

_BATCH_WAIT_S = 0.005  # how long the first input of a group waits for company


@serve.deployment
class EmbeddingServer(ModelReplica["EmbeddingEngine"]):
    def __init__(self, model_config: dict[str, Any], cache_dir: str) -> None:
        from serve_app.loading import build_embedding_engine  # torch in the replica only

        self._load(model_config, cache_dir, build_embedding_engine)
        # Per replica (not a class decorator's constant): the group size is the config's.
        self._embed_one = serve.batch(
            max_batch_size=self.config.engine.max_batch_size, batch_wait_timeout_s=_BATCH_WAIT_S
        )(self._embed_group)

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int] | Rejected:
        """Returns (one vector per text, prompt tokens used) or the reason it was refused."""
        try:
            engine = self._ready_engine()
            counts = await self._off_loop(engine.count_tokens, texts)
            _check_lengths(counts, engine.max_model_len)
        except APIError as exc:
            return Rejected.from_error(exc)
        vectors = await asyncio.gather(*(self._embed_one(text) for text in texts))
        return list(vectors), sum(counts)

    async def _embed_group(self, texts: list[str]) -> list[list[float]]:
        engine = self._ready_engine()
        # The worker thread that counts tokens: one user of the tokenizer at a time.
        return await self._off_loop(engine.embed, texts)


def _check_lengths(counts: list[int], max_model_len: int) -> None:
    for index, count in enumerate(counts):
        if count > max_model_len:
            raise InvalidRequestError(
                f"input[{index}] has {count} tokens; this model's maximum context length is "
                f"{max_model_len} tokens.",
                param="input",
                code="context_length_exceeded",
            )
