"""The embedding model's deployment: Ray Serve's @serve.batch groups concurrent inputs."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from ray import serve

from deployments.placement import replica_has_gpu
from serve_app.config import ModelConfig
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.errors import APIError, InvalidRequestError, ServiceUnavailableError
from serve_app.loading import build_embedding_engine
from serve_app.model_store import ModelSourceError
from serve_app.openai_adapter import Rejected

logger = logging.getLogger(__name__)


@serve.deployment
class EmbeddingServer:
    def __init__(self, model_config: dict[str, Any], cache_dir: str) -> None:
        self.config = ModelConfig.model_validate(model_config)
        self.engine: EmbeddingEngine | None = None
        self.load_error: str | None = None
        try:
            self.engine = build_embedding_engine(
                self.config, Path(cache_dir), has_gpu=replica_has_gpu()
            )
        except ModelSourceError as exc:
            logger.error("model %s unavailable: %s", self.config.id, exc)
            self.load_error = str(exc)

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

    async def info(self) -> dict[str, Any]:
        return {
            "id": self.config.id,
            "ready": self.engine is not None,
            "context_length": self.engine.max_model_len if self.engine else None,
            "error": self.load_error,
        }

    def _ready_engine(self) -> EmbeddingEngine:
        if self.engine is None:
            raise ServiceUnavailableError(
                f"Model '{self.config.id}' is unavailable: {self.load_error}",
                code="model_unavailable",
            )
        return self.engine


def _check_lengths(counts: list[int], max_model_len: int) -> None:
    for index, count in enumerate(counts):
        if count > max_model_len:
            raise InvalidRequestError(
                f"input[{index}] has {count} tokens; this model's maximum context length is "
                f"{max_model_len} tokens.",
                param="input",
                code="context_length_exceeded",
            )
