"""Burst load on the real service: N concurrent chat streams at once, every one accounted for.

Each stream must end in `data: [DONE]` after a finish_reason, or be refused cleanly (429 or 503
in the OpenAI error shape, 429 with Retry-After). Nothing lost: started == done + refused; no
hang, no stream cut without [DONE], no error event, no request left running in the engine.

    .venv/bin/python benchmarks/load.py                      # starts its own service (~1 min)
    .venv/bin/python benchmarks/load.py --url http://127.0.0.1:8000 --streams 200

With config/serve.yaml, SmolLM2 takes 64 running + 64 queued: 200 at once must see 429s.
Exit status 0 only when every stream is accounted for. Results: printed and --out (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from peers import targets

from serve_app.sse import DONE, aiter_data

REPO_ROOT = Path(__file__).resolve().parent.parent
CHAT_MODEL = "smollm2-135m-instruct"
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in two sentences.",
    "Give me three tips for learning Python.",
    "Why is the sky blue?",
]


# ---- the service ---------------------------------------------------------------------------


def check_local(url: str) -> str:
    host = urlparse(url).hostname
    if host not in LOCAL_HOSTS:
        raise SystemExit(f"refusing to send load to {host}: 127.0.0.1 only")
    return url.rstrip("/")


@contextlib.contextmanager
def running_service(out_dir: Path, name: str, timeout_s: float = 420) -> Iterator[str]:
    """`serve run` of config/serve.yaml (every model) on a free 127.0.0.1 port, in its own
    process group (peers.targets, shared with the serving benchmark); yields the URL."""
    out_dir.mkdir(parents=True, exist_ok=True)
    command, port = targets.serve_app_command(out_dir, name, None)
    log_path = out_dir / f"{name}.log"
    with targets.running(name, command, port, CHAT_MODEL, log_path, timeout_s) as server:
        yield server.base_url


def engine_stats(url: str, model: str = CHAT_MODEL) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/admin/models/{model}/stats", timeout=30).json())


def wait_engine_idle(url: str, model: str, timeout_s: float = 60) -> dict[str, Any]:
    """Engine stats once nothing runs or waits (or the last ones seen at the deadline)."""
    deadline = time.monotonic() + timeout_s
    stats = engine_stats(url, model)
    while time.monotonic() < deadline and (stats["num_running"] or stats["num_waiting"]):
        time.sleep(0.5)
        stats = engine_stats(url, model)
    return stats


# ---- one stream ----------------------------------------------------------------------------


@dataclass(slots=True)
class StreamResult:
    """How one request ended: done | refused | error_event | truncated | hung | bad_status |
    transport_error. Times in seconds from the request's start."""

    outcome: str = "transport_error"
    status: int | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    num_deltas: int = 0  # chunks with text, about one per token
    finish_reason: str | None = None
    detail: str = ""


def is_openai_error(payload: Any) -> bool:
    error = payload.get("error") if isinstance(payload, dict) else None
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)


async def read_refusal(response: httpx.Response, result: StreamResult) -> None:
    body = await response.aread()
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    clean = is_openai_error(payload)
    if response.status_code == 429:
        clean = clean and bool(response.headers.get("retry-after"))
    result.outcome = "refused" if clean else "bad_status"
    result.detail = body[:200].decode(errors="replace")


async def read_events(response: httpx.Response, result: StreamResult, start: float) -> None:
    """SSE until [DONE]; the outcome stays `truncated` unless [DONE] closes a finished stream."""
    result.outcome = "truncated"
    async for data in aiter_data(response.aiter_lines()):
        if data == DONE:
            has_finished = result.finish_reason in ("stop", "length")
            result.outcome = "done" if has_finished else result.outcome
            return
        chunk = json.loads(data)
        if "error" in chunk:
            result.outcome, result.detail = "error_event", json.dumps(chunk)[:200]
            continue
        choices = chunk.get("choices") or [{}]
        if choices[0].get("delta", {}).get("content"):
            result.num_deltas += 1
            result.ttft_s = result.ttft_s or time.monotonic() - start
        result.finish_reason = choices[0].get("finish_reason") or result.finish_reason
    if result.outcome == "error_event":
        result.detail += " (and no [DONE])"


async def one_stream(
    client: httpx.AsyncClient, body: dict[str, Any], timeout_s: float
) -> StreamResult:
    result = StreamResult()
    start = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                result.status = response.status_code
                if response.status_code == 200:
                    await read_events(response, result, start)
                else:
                    await read_refusal(response, result)
    except TimeoutError:
        result.outcome = "hung"
    except httpx.HTTPError as exc:
        result.outcome, result.detail = "transport_error", repr(exc)[:200]
    result.latency_s = time.monotonic() - start
    return result


# ---- the burst -----------------------------------------------------------------------------


@dataclass
class LoadReport:
    url: str
    model: str
    num_streams: int
    max_tokens: int
    elapsed_s: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    accounted: bool = False
    latency_done_s: dict[str, float | None] = field(default_factory=dict)
    ttft_done_s: dict[str, float | None] = field(default_factory=dict)
    latency_refused_s: dict[str, float | None] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    engine_after: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)


def percentiles(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)

    def pick(q: float) -> float | None:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": pick(1.0)}


async def burst(url: str, args: argparse.Namespace) -> tuple[list[StreamResult], float]:
    limits = httpx.Limits(max_connections=args.streams + 10, max_keepalive_connections=0)
    timeout = httpx.Timeout(args.request_timeout_s, connect=30)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        bodies = [
            {
                "model": args.model,
                "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": True,
            }
            for i in range(args.streams)
        ]
        start = time.monotonic()
        tasks = [one_stream(client, body, args.request_timeout_s) for body in bodies]
        results = await asyncio.gather(*tasks)
        return list(results), time.monotonic() - start


def build_report(
    url: str, args: argparse.Namespace, results: list[StreamResult], elapsed_s: float
) -> LoadReport:
    counts = Counter(r.outcome for r in results)
    done = [r for r in results if r.outcome == "done"]
    refused = [r for r in results if r.outcome == "refused"]
    report = LoadReport(url, args.model, len(results), args.max_tokens, round(elapsed_s, 2))
    report.counts = {"started": len(results), **counts}
    report.statuses = {str(k): v for k, v in Counter(r.status for r in results).items()}
    report.accounted = len(results) == len(done) + len(refused)
    report.latency_done_s = percentiles([r.latency_s or 0 for r in done])
    report.ttft_done_s = percentiles([r.ttft_s for r in done if r.ttft_s is not None])
    report.latency_refused_s = percentiles([r.latency_s or 0 for r in refused])
    report.tokens_per_s = round(sum(r.num_deltas for r in done) / elapsed_s, 1)
    bad = [r for r in results if r.outcome not in ("done", "refused")]
    report.examples = [asdict(r) for r in (bad or refused)[:5]]
    return report


def print_report(report: LoadReport) -> None:
    c = report.counts
    print(
        f"\n{report.num_streams} concurrent streams to {report.model} ({report.url}), "
        f"max_tokens={report.max_tokens}: {report.elapsed_s} s"
    )
    print(
        f"  started {c['started']} = done {c.get('done', 0)} + refused {c.get('refused', 0)}"
        f" -> accounted: {report.accounted}"
    )
    print(f"  outcomes {dict(sorted(c.items()))}, HTTP statuses {report.statuses}")
    print(f"  done: latency {report.latency_done_s}, ttft {report.ttft_done_s}")
    print(f"  refused: latency {report.latency_refused_s}")
    print(f"  ~{report.tokens_per_s} text deltas/s streamed overall (about tokens/s)")
    print(f"  engine after: {report.engine_after}")
    for example in report.examples[:3]:
        print(f"  e.g. {example}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", help="a running service on 127.0.0.1 (default: start one)")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default=CHAT_MODEL)
    parser.add_argument(
        "--request-timeout-s", type=float, default=300, help="a stream past it is hung"
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "load.json")
    return parser.parse_args()


def run(url: str, args: argparse.Namespace) -> LoadReport:
    url = check_local(url)
    before = engine_stats(url, args.model)
    results, elapsed_s = asyncio.run(burst(url, args))
    report = build_report(url, args, results, elapsed_s)
    after = wait_engine_idle(url, args.model)
    report.engine_after = {
        "num_running": after["num_running"],
        "num_waiting": after["num_waiting"],
        "finished_during_burst": after["num_finished"] - before["num_finished"],
        "aborted_during_burst": after["num_aborted"] - before["num_aborted"],
    }
    return report


def main() -> None:
    args = parse_args()
    if args.url:
        report = run(args.url, args)
    else:
        with running_service(args.out.parent, f"load-service-{time.strftime('%H%M%S')}") as url:
            print(f"service ready at {url}", flush=True)
            report = run(url, args)
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(asdict(report), indent=2))
    print(f"  written to {args.out}")
    idle = report.engine_after["num_running"] == 0 and report.engine_after["num_waiting"] == 0
    sys.exit(0 if report.accounted and idle else 1)


if __name__ == "__main__":
    main()
