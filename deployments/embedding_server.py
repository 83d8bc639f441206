"""The embedding model's deployment: Ray Serve's @serve.batch groups concurrent inputs."""

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


@serve.deployment
class EmbeddingServer(ModelReplica["EmbeddingEngine"]):
    def __init__(self, model_config: dict[str, Any], cache_dir: str) -> None:
        from serve_app.loading import build_embedding_engine  # torch in the replica only

        self._load(model_config, cache_dir, build_embedding_engine)

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int] | Rejected:
        """Returns (one vector per text, prompt tokens used) or the reason it was refused."""
        try:
            engine = self._ready_engine()
            counts = engine.count_tokens(texts)
            _check_lengths(counts, engine.max_model_len)
        except APIError as exc:
            return Rejected(exc.status_code, exc.message, exc.error_type, exc.param, exc.code)
        vectors = await asyncio.gather(*(self._embed_one(text) for text in texts))
        return list(vectors), sum(counts)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _embed_one(self, texts: list[str]) -> list[list[float]]:
        engine = self._ready_engine()
        return await asyncio.to_thread(engine.embed, texts)


def _check_lengths(counts: list[int], max_model_len: int) -> None:
    for index, count in enumerate(counts):
        if count > max_model_len:
            raise InvalidRequestError(
                f"input[{index}] has {count} tokens; this model's maximum context length is "
                f"{max_model_len} tokens.",
                param="input",
                code="context_length_exceeded",
            )
