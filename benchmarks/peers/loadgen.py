"""Load generator of the serving benchmark: one fixed-concurrency level, measured per request.

Every target is driven the same way: HTTP ones through raw SSE reads of
`/v1/chat/completions` (httpx, no SDK), the offline engine through `LLMEngine.generate`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from peers import noise
from serve_app.sse import DONE, aiter_data

# Fixed, deterministic chat prompts that ask for long answers, so most requests run to
# max_tokens on every target (greedy decoding of the same model gives the same lengths).
PROMPTS = [
    "Write a detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Write a long letter to a friend describing your trip to the mountains.",
    "Describe the history of the Roman Empire in several paragraphs.",
    "Give a detailed guide to starting a vegetable garden for beginners.",
    "Write an essay about why reading books is important for children.",
    "Explain how the internet works, from cables to web pages, in detail.",
    "Write a story about a robot who learns to paint.",
    "Describe a day in the life of a medieval blacksmith in detail.",
    "Explain the water cycle to a ten-year-old, with examples.",
    "Write a detailed recipe for baking bread at home, with tips.",
    "Describe the planets of the solar system one by one.",
    "Write an essay on the advantages and disadvantages of city life.",
    "Tell a long fairy tale about a clever fox and a proud lion.",
    "Explain how vaccines train the immune system, in detail.",
    "Write a detailed travel guide for a weekend in Paris.",
]


def messages_for(index: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}]


@dataclass(slots=True)
class RequestResult:
    """What one request measured. Times are seconds from the moment it was sent."""

    ttft_s: float | None = None
    e2e_s: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    num_usage_tokens: int | None = None  # from the usage chunk, when the server sends one
    error: str | None = None
    is_complete: bool = False

    @property
    def num_output_tokens(self) -> int:
        if self.num_usage_tokens is not None:
            return self.num_usage_tokens
        return len(self.chunk_times)

    def add_chunk(self, elapsed_s: float) -> None:
        if self.ttft_s is None:
            self.ttft_s = elapsed_s
        self.chunk_times.append(elapsed_s)


Sender = Callable[[int, RequestResult], Awaitable[None]]


def http_sender(client: httpx.AsyncClient, base_url: str, model: str, max_tokens: int) -> Sender:
    """Streams chat request `index` to an OpenAI-compatible server; fills `result` as it goes."""

    async def send(index: int, result: RequestResult) -> None:
        body = {
            "model": model,
            "messages": messages_for(index),
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = time.perf_counter()
        async with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"HTTP {resp.status_code}: {text[:200]}"
                return
            async for data in aiter_data(resp.aiter_lines()):
                if data == DONE:
                    break
                if not _take_event(json.loads(data), result, time.perf_counter() - started):
                    return
        result.e2e_s = time.perf_counter() - started
        result.is_complete = True

    return send


def _take_event(event: dict[str, Any], result: RequestResult, elapsed_s: float) -> bool:
    """Records one SSE event; False when it is an error event (the request failed)."""
    if "error" in event:
        result.error = f"stream error: {json.dumps(event['error'])[:200]}"
        return False
    for choice in event.get("choices") or []:
        if (choice.get("delta") or {}).get("content"):
            result.add_chunk(elapsed_s)
    usage = event.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        result.num_usage_tokens = int(usage["completion_tokens"])
    return True


@dataclass(slots=True)
class Quiet:
    """Before a level, wait up to max_wait_s for other processes to use under max_cores; a level
    during which they used more is measured again, up to max_retries times (quietest kept)."""

    session_id: int | None = None  # the server's session: its processes are ours, not noise
    max_cores: float = 0.3
    max_wait_s: float = 0.0
    max_retries: int = 0


async def run_quietest_level(
    send: Sender, concurrency: int, num_requests: int, timeout_s: float, quiet: Quiet
) -> dict[str, Any]:
    """run_level, repeated while other processes were busy; returns the quietest attempt."""
    attempts = []
    for _ in range(quiet.max_retries + 1):
        attempts.append(await run_level(send, concurrency, num_requests, timeout_s, quiet))
        if attempts[-1]["cores_others"] < quiet.max_cores:
            break
    best = dict(min(attempts, key=lambda row: row["cores_others"]))
    keys = ("output_tok_s", "cores_others", "num_timed_out")
    best["attempts"] = [{key: row[key] for key in keys} for row in attempts]
    return best


async def run_level(
    send: Sender,
    concurrency: int,
    num_requests: int,
    timeout_s: float,
    quiet: Quiet | None = None,
) -> dict[str, Any]:
    """Runs `num_requests` requests with exactly `concurrency` in flight (no ramp).

    Requests still running after `timeout_s` are cancelled and counted as `num_timed_out`;
    the tokens they had streamed still count towards the aggregate rate.
    """
    quiet = quiet or Quiet()
    waited_s = 0.0
    if quiet.max_wait_s > 0:
        waited_s = await noise.wait_for_quiet(quiet.session_id, quiet.max_cores, quiet.max_wait_s)
    cpu_before = noise.snapshot(quiet.session_id)
    results = [RequestResult() for _ in range(num_requests)]
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < num_requests:
            index = next_index
            next_index += 1
            try:
                await send(index, results[index])
            except asyncio.CancelledError:
                results[index].error = results[index].error or "timed out (level deadline)"
                raise
            except Exception as exc:  # noqa: BLE001 -- any failure is one error, keep going
                results[index].error = f"{type(exc).__name__}: {exc}"[:200]

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(workers, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    duration_s = time.perf_counter() - started
    summary = summarize(results, duration_s)
    summary.update(concurrency=concurrency, loadavg_1m=[load_before, os.getloadavg()[0]])
    cpu_after = noise.snapshot(quiet.session_id)
    cores = noise.cores_used(cpu_before, cpu_after)
    summary.update(cores)
    by_process = noise.server_cores_by_process(cpu_before, cpu_after)
    summary["server_cores_by_process"] = {k: v for k, v in by_process.items() if v >= 0.01}
    server_cpu_s = cores["cores_server"] * duration_s
    summary["tok_per_server_cpu_s"] = (
        summary["output_tokens"] / server_cpu_s if server_cpu_s else None
    )
    summary["quiet_wait_s"] = waited_s
    return summary


def summarize(results: list[RequestResult], duration_s: float) -> dict[str, Any]:
    done = [r for r in results if r.is_complete and r.error is None]
    num_tokens = sum(r.num_output_tokens for r in results)
    itl = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    ttft = [r.ttft_s for r in done if r.ttft_s is not None]
    e2e = [r.e2e_s for r in done if r.e2e_s is not None]
    errors = [r.error for r in results if r.error]
    return {
        "num_requests": len(results),
        "num_ok": len(done),
        "num_errors": sum(1 for e in errors if not e.startswith("timed out")),
        "num_timed_out": sum(1 for e in errors if e.startswith("timed out")),
        "error_samples": sorted(set(errors))[:3],
        "token_count_source": _token_source(results),
        "duration_s": duration_s,
        "output_tokens": num_tokens,
        "output_tok_s": num_tokens / duration_s if duration_s > 0 else 0.0,
        "mean_output_tokens": (sum(r.num_output_tokens for r in done) / len(done)) if done else 0,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p99_s": percentile(e2e, 99),
    }


def _token_source(results: list[RequestResult]) -> str:
    sources = {"usage" if r.num_usage_tokens is not None else "chunks" for r in results}
    return "+".join(sorted(sources)) or "none"


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def format_row(target: str, row: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        value = row.get(key)
        return "     -" if value is None else f"{value * 1000:6.0f}"

    return (
        f"{target:18s} c={row['concurrency']:>2} n={row['num_requests']:>3} "
        f"tok/s={row['output_tok_s']:7.1f} ttft50={ms('ttft_p50_s')} ttft99={ms('ttft_p99_s')} "
        f"itl50={ms('itl_p50_s')} itl99={ms('itl_p99_s')} e2e50={ms('e2e_p50_s')} "
        f"e2e99={ms('e2e_p99_s')} ms err={row['num_errors']} cut={row['num_timed_out']} "
        f"server={row['cores_server']:.2f} others={row['cores_others']:.2f} cores"
    )
