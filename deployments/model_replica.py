"""What the LLM and embedding deployments share: loading that survives missing weights,
`info` for /v1/models and /health, and the 503 while the model is not loaded."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from deployments.placement import replica_has_gpu
from serve_app.config import ModelConfig
from serve_app.errors import ServiceUnavailableError
from serve_app.model_store import ModelSourceError

if TYPE_CHECKING:  # torch stays out of the processes that only build the Serve apps
    from serve_app.engine.embedding import EmbeddingEngine
    from serve_app.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

EngineT = TypeVar("EngineT", "LLMEngine", "EmbeddingEngine")


class ModelReplica(Generic[EngineT]):
    config: ModelConfig
    engine: EngineT | None
    load_error: str | None

    def _load(
        self,
        model_config: dict[str, Any],
        cache_dir: str,
        build: Callable[[ModelConfig, Path, bool], EngineT],
    ) -> None:
        self.config = ModelConfig.model_validate(model_config)
        self.engine, self.load_error = None, None
        try:
            self.engine = build(self.config, Path(cache_dir), replica_has_gpu())
        except ModelSourceError as exc:
            # Keep the replica up so the other models keep serving; this one answers 503.
            logger.error("model %s unavailable: %s", self.config.id, exc)
            self.load_error = str(exc)

    async def info(self) -> dict[str, Any]:
        return {
            "id": self.config.id,
            "ready": self.engine is not None,
            "context_length": self.engine.max_model_len if self.engine else None,
            "error": self.load_error,
            "pid": os.getpid(),
        }

    def _ready_engine(self) -> EngineT:
        if self.engine is None:
            raise ServiceUnavailableError(
                f"Model '{self.config.id}' is unavailable: {self.load_error}",
                code="model_unavailable",
            )
        return self.engine
