"""Mixed soak below capacity: does memory stay flat and does every request end as it should?

For --duration seconds (default 600) a fixed set of workers loops: chat streams, streams
cancelled after their first token, bad requests (each must get its own 4xx in the OpenAI
shape), embeddings, completions on gemma (streamed and not). At most --concurrency requests
are in flight, far below the models' queues, so any 5xx, unexpected status, stream without
[DONE] or error event counts as an error (target: zero). Every --sample-s seconds the
SmolLM2 (and gemma) replica's VmRSS is read from /proc/<pid>/status (pid from
GET /admin/models/<id>/stats); memory growth = end vs. after warm-up (target < 10 %).

    .venv/bin/python benchmarks/soak.py                      # starts its own service
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8000 --duration 120

Exit status 0 only when both targets are met. Results: printed and --out (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from load import CHAT_MODEL, QUESTIONS, check_local, engine_stats, running_service

from serve_app.sse import DONE, aiter_data

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_MODEL = "gemma-3-270m"
EMBED_MODEL = "all-minilm-l6-v2"
SAMPLED_MODELS = (CHAT_MODEL, BASE_MODEL)
Action = Callable[[], Awaitable[None]]
MAX_RSS_GROWTH_PCT = 10.0

HI = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
# (path, JSON body or raw bytes, expected status): each must be refused with that status.
BAD_REQUESTS: list[tuple[str, Any, int]] = [
    (CHAT, b'{"model": "x", ', 400),
    (CHAT, {"model": "no-such-model", "messages": HI}, 404),
    (CHAT, {"model": CHAT_MODEL, "messages": "hi"}, 400),
    (CHAT, {"model": CHAT_MODEL, "messages": HI, "n": 2}, 400),
    (CHAT, {"model": BASE_MODEL, "messages": HI}, 400),
    (CHAT, {"model": CHAT_MODEL, "messages": HI, "max_tokens": 10**6}, 400),
    ("/v1/completions", {"model": CHAT_MODEL, "prompt": [10**9]}, 400),
    ("/v1/completions", {"model": CHAT_MODEL, "prompt": "hi", "temperature": "hot"}, 400),
    ("/v1/embeddings", {"model": EMBED_MODEL, "input": [""]}, 400),
    ("/v1/embeddings", {"model": CHAT_MODEL, "input": "hi"}, 400),
    ("/v1/embeddings", b"[1, 2, 3]", 400),
]


@dataclass
class Tally:
    """Per-kind counts; `errors` keeps the first few failures for the report."""

    ok: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, Any]] = field(default_factory=list)
    failed_by_minute: Counter[int] = field(default_factory=Counter)
    start: float = field(default_factory=time.monotonic)

    def good(self, kind: str) -> None:
        self.ok[kind] += 1

    def bad(self, kind: str, detail: str) -> None:
        self.failed[kind] += 1
        self.failed_by_minute[int((time.monotonic() - self.start) // 60)] += 1
        if len(self.errors) < 20:
            self.errors.append(
                {"kind": kind, "at": time.strftime("%H:%M:%S"), "detail": detail[:300]}
            )


# ---- the workers -----------------------------------------------------------------------------


def chat_body(max_tokens: int, stream: bool = True) -> dict[str, Any]:
    question = random.choice(QUESTIONS)
    return {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": {"include_usage": True},
    }


async def read_stream(response: httpx.Response) -> str | None:
    """None when the stream finished properly and ended with [DONE]; else what went wrong."""
    finish_reason = None
    async for data in aiter_data(response.aiter_lines()):
        if data == DONE:
            return None if finish_reason in ("stop", "length") else "[DONE] before a finish_reason"
        chunk = json.loads(data)
        if "error" in chunk:
            return f"error event: {data}"
        for choice in chunk.get("choices", []):
            finish_reason = choice.get("finish_reason") or finish_reason
    return "stream closed without [DONE]"


async def stream_once(client: httpx.AsyncClient, tally: Tally) -> None:
    body = chat_body(random.randint(16, 64))
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            tally.bad("stream", f"{response.status_code} {(await response.aread())[:200]!r}")
            return
        problem = await read_stream(response)
    tally.bad("stream", problem) if problem else tally.good("stream")


async def cancel_once(client: httpx.AsyncClient, tally: Tally) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(500)) as response:
        if response.status_code != 200:
            tally.bad("cancel", f"{response.status_code} {(await response.aread())[:200]!r}")
            return
        async for data in aiter_data(response.aiter_lines()):
            if '"content":"' in data and '"content":""' not in data:
                break  # leaving the block closes the connection after the first token
        else:
            tally.bad("cancel", "stream ended before its first token")
            return
    tally.good("cancel")


async def bad_once(
    client: httpx.AsyncClient, tally: Tally, bad: Iterator[tuple[str, Any, int]]
) -> None:
    path, body, expected = next(bad)
    if isinstance(body, bytes):
        headers = {"content-type": "application/json"}
        response = await client.post(path, content=body, headers=headers)
    else:
        response = await client.post(path, json=body)
    error = (
        response.json().get("error")
        if response.headers.get("content-type", "").startswith("application/json")
        else None
    )
    if response.status_code != expected or not isinstance(error, dict) or not error.get("message"):
        tally.bad(
            "bad_request", f"{path} {body!r:.80}: {response.status_code} {response.text[:150]}"
        )
    else:
        tally.good("bad_request")


async def embed_once(client: httpx.AsyncClient, tally: Tally) -> None:
    texts = random.sample(QUESTIONS, k=random.randint(1, len(QUESTIONS)))
    response = await client.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": texts})
    if response.status_code != 200 or len(response.json()["data"]) != len(texts):
        tally.bad("embedding", f"{response.status_code} {response.text[:200]}")
    else:
        tally.good("embedding")


async def gemma_once(client: httpx.AsyncClient, tally: Tally, stream: bool) -> None:
    body = {"model": BASE_MODEL, "prompt": "Once upon a time", "max_tokens": 16, "stream": stream}
    if stream:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                tally.bad("gemma_stream", f"{response.status_code}")
                return
            problem = await read_stream(response)
        tally.bad("gemma_stream", problem) if problem else tally.good("gemma_stream")
        return
    response = await client.post("/v1/completions", json=body)
    reason = (
        response.json().get("choices", [{}])[0].get("finish_reason")
        if response.status_code == 200
        else None
    )
    if reason not in ("stop", "length"):
        tally.bad("gemma", f"{response.status_code} {response.text[:200]}")
    else:
        tally.good("gemma")


async def worker(name: str, action: Action, tally: Tally, stop_at: float, pause_s: float) -> None:
    while time.monotonic() < stop_at:
        try:
            await action()
        except (httpx.HTTPError, ValueError, KeyError) as exc:  # timeouts, bad JSON, bad shape
            tally.bad(name, repr(exc))
        await asyncio.sleep(pause_s * random.random())


# ---- memory ----------------------------------------------------------------------------------


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def sampler(url: str, samples: list[dict[str, Any]], stop_at: float, every_s: float) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        start = time.monotonic()
        while time.monotonic() < stop_at:
            sample: dict[str, Any] = {"t_s": round(time.monotonic() - start, 1)}
            for model in SAMPLED_MODELS:
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    stats = (await client.get(f"/admin/models/{model}/stats")).json()
                    sample[model] = {
                        "pid": stats["pid"],
                        "rss_kib": rss_kib(stats["pid"]),
                        "num_running": stats["num_running"],
                    }
            samples.append(sample)
            await asyncio.sleep(every_s)


def memory_growth(samples: list[dict[str, Any]], model: str, warmup_s: float) -> dict[str, Any]:
    """Mean RSS over the first minute after warm-up vs. the last minute; growth in %."""
    points = [(s["t_s"], s[model]["rss_kib"]) for s in samples if s.get(model, {}).get("rss_kib")]
    pids = {s[model]["pid"] for s in samples if model in s}
    after = [(t, r) for t, r in points if t >= warmup_s]
    if len(after) < 2:
        return {"error": "too few samples after warm-up", "pids": sorted(pids)}
    end_t = after[-1][0]
    first = [r for t, r in after if t < warmup_s + 60] or [after[0][1]]
    last = [r for t, r in after if t > end_t - 60] or [after[-1][1]]
    base, end = statistics.mean(first), statistics.mean(last)
    return {
        "pids": sorted(pids),  # more than one: the replica was replaced mid-soak
        "rss_mib_after_warmup": round(base / 1024, 1),
        "rss_mib_end": round(end / 1024, 1),
        "rss_mib_max": round(max(r for _, r in after) / 1024, 1),
        "growth_pct": round(100 * (end - base) / base, 2),
        "num_samples": len(after),
    }


# ---- the soak --------------------------------------------------------------------------------


@dataclass
class SoakReport:
    url: str
    duration_s: float
    warmup_s: float
    concurrency: int
    requests_ok: dict[str, int] = field(default_factory=dict)
    requests_failed: dict[str, int] = field(default_factory=dict)
    num_errors: int = 0
    errors_by_minute: dict[int, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    engine_after: dict[str, Any] = field(default_factory=dict)
    passed: bool = False
    samples: list[dict[str, Any]] = field(default_factory=list)


async def soak(url: str, args: argparse.Namespace) -> SoakReport:
    tally, samples = Tally(), list[dict[str, Any]]()
    stop_at = time.monotonic() + args.duration
    bad = itertools.cycle(BAD_REQUESTS)
    timeout = httpx.Timeout(args.request_timeout_s, connect=30)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        every: list[tuple[str, Action, float]] = [
            ("stream", lambda: stream_once(client, tally), 1.0),
            ("stream", lambda: stream_once(client, tally), 1.0),
            ("stream", lambda: stream_once(client, tally), 1.0),
            ("cancel", lambda: cancel_once(client, tally), 1.0),
            ("bad_request", lambda: bad_once(client, tally, bad), 0.5),
            ("embedding", lambda: embed_once(client, tally), 1.0),
            ("gemma", lambda: gemma_once(client, tally, stream=False), 2.0),
            ("gemma_stream", lambda: gemma_once(client, tally, stream=True), 2.0),
        ]
        actions = every[: args.concurrency]
        tasks = [worker(name, action, tally, stop_at, pause) for name, action, pause in actions]
        try:  # workers stop taking work at stop_at; one in flight has its request timeout
            async with asyncio.timeout(args.duration + args.request_timeout_s + 60):
                await asyncio.gather(sampler(url, samples, stop_at, args.sample_s), *tasks)
        except TimeoutError:
            tally.bad("soak", "workers still busy long after the end: a request hung")
    report = SoakReport(url, args.duration, args.warmup, len(actions))
    report.requests_ok, report.requests_failed = dict(tally.ok), dict(tally.failed)
    report.num_errors, report.errors = sum(tally.failed.values()), tally.errors
    report.errors_by_minute = dict(sorted(tally.failed_by_minute.items()))
    report.memory = {m: memory_growth(samples, m, args.warmup) for m in SAMPLED_MODELS}
    report.samples = samples
    return report


def finish(url: str, report: SoakReport, before: dict[str, Any]) -> None:
    stats = engine_stats(url)
    deadline = time.monotonic() + 60
    while (stats["num_running"] or stats["num_waiting"]) and time.monotonic() < deadline:
        time.sleep(0.5)
        stats = engine_stats(url)
    report.engine_after = {
        "num_running": stats["num_running"],
        "num_waiting": stats["num_waiting"],
        "finished_during_soak": stats["num_finished"] - before["num_finished"],
        "aborted_during_soak": stats["num_aborted"] - before["num_aborted"],
    }
    growth = report.memory[CHAT_MODEL].get("growth_pct")
    is_idle = stats["num_running"] == 0 and stats["num_waiting"] == 0
    is_one_replica = len(report.memory[CHAT_MODEL].get("pids", [])) == 1
    report.passed = (
        report.num_errors == 0
        and growth is not None
        and growth < MAX_RSS_GROWTH_PCT
        and is_idle
        and is_one_replica
    )


def print_report(report: SoakReport) -> None:
    print(
        f"\nsoak of {report.duration_s:.0f} s at {report.url}, {report.concurrency} workers "
        f"(warm-up {report.warmup_s:.0f} s)"
    )
    print(f"  ok: {report.requests_ok} (total {sum(report.requests_ok.values())})")
    print(f"  errors: {report.num_errors} {report.requests_failed}")
    if report.errors_by_minute:
        print(f"  errors by minute of the soak: {report.errors_by_minute}")
    for error in report.errors[:5]:
        print(f"    {error}")
    for model, memory in report.memory.items():
        print(f"  {model} RSS: {memory}")
    print(f"  engine after ({CHAT_MODEL}): {report.engine_after}")
    print(
        f"  targets (zero errors, RSS growth < {MAX_RSS_GROWTH_PCT} %, idle after, one replica): "
        f"{'met' if report.passed else 'NOT met'}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", help="a running service on 127.0.0.1 (default: start one)")
    parser.add_argument("--duration", type=float, default=600, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=60, help="seconds before the RSS baseline")
    parser.add_argument("--sample-s", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=8, help="workers (max 8: one of each)")
    parser.add_argument("--request-timeout-s", type=float, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "soak.json")
    return parser.parse_args()


def run(url: str, args: argparse.Namespace) -> SoakReport:
    url = check_local(url)
    before = engine_stats(url)
    report = asyncio.run(soak(url, args))
    finish(url, report, before)
    return report


def main() -> None:
    args = parse_args()
    random.seed(args.seed)
    if args.url:
        report = run(args.url, args)
    else:
        with running_service(args.out.parent, f"soak-service-{time.strftime('%H%M%S')}") as url:
            print(f"service ready at {url}", flush=True)
            report = run(url, args)
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(asdict(report), indent=2))
    print(f"  written to {args.out}")
    sys.exit(0 if report.passed else 1)


if __name__ == "__main__":
    main()
