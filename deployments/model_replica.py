"""What the LLM and embedding deployments share: loading that survives missing weights,
`info` for /v1/models and /health, the 503 while the model is not loaded, and the thread that
tokenizes off the replica's event loop."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from deployments.placement import replica_has_gpu
from serve_app.config import ModelConfig
from serve_app.errors import ServiceUnavailableError
from serve_app.model_store import ModelSourceError

logger = logging.getLogger(__name__)


class _Engine(Protocol):
    """What every engine a replica holds has (LLMEngine, EngineClient, EmbeddingEngine)."""

    @property
    def max_model_len(self) -> int: ...


EngineT = TypeVar("EngineT", bound=_Engine)
T = TypeVar("T")


class ModelReplica(Generic[EngineT]):
    config: ModelConfig
    engine: EngineT | None
    load_error: str | None
    _worker: ThreadPoolExecutor

    def _load(
        self,
        model_config: dict[str, Any],
        cache_dir: str,
        build: Callable[[ModelConfig, Path, bool], EngineT],
    ) -> None:
        self.config = ModelConfig.model_validate(model_config)
        self.engine, self.load_error = None, None
        # One thread, so the tokenizer is never used by two calls at once (a fast tokenizer
        # that changes its padding or truncation while another call encodes raises "Already
        # borrowed"), and the event loop that every stream of this replica runs on never waits
        # for a long prompt (bodies up to 4 MiB).
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        started = time.monotonic()
        try:
            self.engine = build(self.config, Path(cache_dir), replica_has_gpu())
            logger.info("model %s loaded in %.1f s", self.config.id, time.monotonic() - started)
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

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in the replica's worker thread; the event loop serves other calls."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _ready_engine(self) -> EngineT:
        if self.engine is None:
            raise ServiceUnavailableError(
                f"Model '{self.config.id}' is unavailable: {self.load_error}",
                code="model_unavailable",
            )
        return self.engine
