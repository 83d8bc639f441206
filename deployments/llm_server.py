"""One Ray Serve deployment per LLM: a thin shim that feeds the replica's engine.

The ingress calls `generate` through a streaming handle; the first event says whether the call
was admitted (prompt token count) or rejected (an API error), then engine deltas follow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ray import serve

from deployments.metrics import RequestTimer, record_engine_stats
from deployments.model_replica import ModelReplica
from serve_app.engine.types import RequestOutput
from serve_app.errors import APIError
from serve_app.openai_adapter import Admitted, GenerateCall, Rejected, prompt_token_ids

if TYPE_CHECKING:
    from serve_app.engine.llm_engine import LLMEngine  # noqa: F401 (the base class names it)

logger = logging.getLogger(__name__)

# A step that has not come back for this long means the inference thread is stuck.
_MAX_STEP_SECONDS = 120.0


@serve.deployment
class LLMServer(ModelReplica["LLMEngine"]):
    def __init__(self, model_config: dict[str, Any], cache_dir: str) -> None:
        # Imported here: torch and transformers load in the replica only, not in the Serve
        # controller's app-building task (4 apps built in parallel on 2 cores: ~8 s of warm start).
        from serve_app.loading import build_llm_engine

        self._load(model_config, cache_dir, build_llm_engine)

    async def generate(
        self, call: GenerateCall
    ) -> AsyncIterator[Admitted | Rejected | RequestOutput]:
        try:
            engine = self._ready_engine()
            prompt_ids = await self._off_loop(
                prompt_token_ids, call, engine.tokenizer, engine.max_model_len
            )
        except APIError as exc:
            yield Rejected.from_error(exc)
            return
        params = call.sampling
        if params.max_tokens is None and self.config.engine.default_max_tokens:
            params = dataclasses.replace(params, max_tokens=self.config.engine.default_max_tokens)
        yield Admitted(len(prompt_ids))
        timer = RequestTimer(self.config.id)
        record_engine_stats(self.config.id, engine.stats())
        try:
            async for output in engine.generate(call.request_id, prompt_ids, params):
                timer.observe(output)
                yield output
        finally:
            if not timer.is_finished:  # the client went away (or the ingress gave up)
                timer.cancelled()
            record_engine_stats(self.config.id, engine.stats())

    async def stats(self) -> dict[str, Any]:
        if self.engine is None:
            return {"error": self.load_error, "pid": os.getpid()}
        return {**dataclasses.asdict(self.engine.stats()), "pid": os.getpid()}

    def check_health(self) -> None:
        """Ray calls this periodically; raising makes Ray replace the replica."""
        engine = self.engine
        if engine is None:
            return
        if not engine.is_alive:
            raise RuntimeError(f"{self.config.id}: inference thread died")
        if engine.is_stuck(_MAX_STEP_SECONDS):
            raise RuntimeError(f"{self.config.id}: inference thread stuck")
