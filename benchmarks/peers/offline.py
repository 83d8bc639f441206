"""Offline target of the serving benchmark: serve-app's engine in this process, no HTTP, no Ray.

Same model, engine settings, prompts (chat template applied as the replica does) and levels as
the HTTP targets, so HTTP tok/s over offline tok/s is what the serving path keeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peers.loadgen import (
    Quiet,
    RequestResult,
    Sender,
    format_row,
    messages_for,
    run_level,
    run_quietest_level,
)
from serve_app.config import ModelConfig
from serve_app.engine.llm_engine import LLMEngine
from serve_app.engine.types import SamplingParams


def engine_sender(engine: LLMEngine, max_tokens: int, tag: str) -> Sender:
    tokenizer = engine.tokenizer

    async def send(index: int, result: RequestResult) -> None:
        encoded = tokenizer.apply_chat_template(
            messages_for(index), add_generation_prompt=True, tokenize=True, return_dict=True
        )
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        started = time.perf_counter()
        async for output in engine.generate(f"{tag}-{index}", list(encoded["input_ids"]), params):
            if output.text:
                result.add_chunk(time.perf_counter() - started)
            if output.finish_reason == "error":
                result.error = f"engine error: {output.error}"
                return
            if output.is_finished:
                result.num_usage_tokens = output.num_generated_tokens
        result.e2e_s = time.perf_counter() - started
        result.is_complete = True

    return send


def engine_maker(engine: LLMEngine) -> Callable[[int, str], Sender]:
    """(max_tokens, tag) -> engine_sender, the shape interleaved rounds take."""

    def make(max_tokens: int, tag: str) -> Sender:
        return engine_sender(engine, max_tokens, tag)

    return make


async def _sweep(
    engine: LLMEngine,
    levels: list[tuple[int, int]],
    max_tokens: int,
    timeout_s: float,
    quiet: Quiet,
) -> list[dict[str, Any]]:
    await run_level(engine_sender(engine, 16, "warmup"), 1, 1, timeout_s)
    await run_level(engine_sender(engine, 16, "warmup4"), 4, 4, timeout_s)
    rows = []
    for concurrency, num_requests in levels:
        send = engine_sender(engine, max_tokens, f"c{concurrency}")
        row = await run_quietest_level(send, concurrency, num_requests, timeout_s, quiet)
        rows.append(row)
        print(format_row("offline-engine", row), flush=True)
    return rows


def run_offline(
    model_config: ModelConfig,
    cache_dir: Path,
    levels: list[tuple[int, int]],
    max_tokens: int,
    timeout_s: float,
    quiet: Quiet,
) -> dict[str, Any]:
    """Builds the engine exactly as a replica does (serve_app.loading) and sweeps the levels."""
    from serve_app.loading import build_llm_engine

    started = time.perf_counter()
    engine = build_llm_engine(model_config, cache_dir)
    load_s = time.perf_counter() - started
    try:
        rows = asyncio.run(_sweep(engine, levels, max_tokens, timeout_s, quiet))
    finally:
        engine.shutdown()
    return {"startup_s": load_s, "levels": rows}
