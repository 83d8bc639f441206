"""Prometheus metrics per model, exported through Ray's metrics agent (ray.serve.metrics).

Names follow vLLM's (`vllm:time_to_first_token_seconds` -> `serve_app_time_to_first_token_seconds`;
Ray's OpenTelemetry exporter drops names with a colon, so `_` stands for `:`);
Ray prefixes them with `ray_` on the scrape endpoint. Every metric has the label `model`.
Created lazily inside the replica process: metric objects must not be pickled with the app.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from ray.serve.metrics import Counter, Gauge, Histogram

from serve_app.engine.types import EngineStats, RequestOutput

_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
_TOKEN_GAP_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5]
MODEL = ("model",)
SUCCESS_REASONS = frozenset({"stop", "length"})


@dataclass(frozen=True, slots=True)
class ServeMetrics:
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    e2e_latency: Histogram
    queue_time: Histogram
    num_running: Gauge
    num_waiting: Gauge
    prompt_tokens: Counter
    generation_tokens: Counter
    request_success: Counter
    request_cancelled: Counter
    request_errors: Counter


@functools.cache
def serve_metrics() -> ServeMetrics:
    def histogram(name: str, text: str, buckets: list[float]) -> Histogram:
        return Histogram(f"serve_app_{name}", text, boundaries=buckets, tag_keys=MODEL)

    return ServeMetrics(
        time_to_first_token=histogram(
            "time_to_first_token_seconds",
            "Request arrival at the replica to first token.",
            _LATENCY_BUCKETS,
        ),
        inter_token_latency=histogram(
            "inter_token_latency_seconds", "Time between two generated tokens.", _TOKEN_GAP_BUCKETS
        ),
        e2e_latency=histogram(
            "e2e_request_latency_seconds", "Request arrival to last token.", _LATENCY_BUCKETS
        ),
        queue_time=histogram(
            "request_queue_time_seconds", "Time waiting for a batch slot.", _LATENCY_BUCKETS
        ),
        num_running=Gauge("serve_app_num_requests_running", "Requests in the batch.", MODEL),
        num_waiting=Gauge("serve_app_num_requests_waiting", "Requests waiting for a slot.", MODEL),
        prompt_tokens=Counter("serve_app_prompt_tokens_total", "Prefilled tokens.", MODEL),
        generation_tokens=Counter("serve_app_generation_tokens_total", "Generated tokens.", MODEL),
        request_success=Counter(
            "serve_app_request_success_total",
            "Finished requests by finish reason.",
            ("model", "finished_reason"),  # type: ignore[arg-type]  # Ray annotates Tuple[str]
        ),
        request_cancelled=Counter(
            "serve_app_request_cancelled_total", "Requests whose client went away.", MODEL
        ),
        request_errors=Counter(
            "serve_app_request_errors_total",
            "Failed requests by HTTP status.",
            ("model", "status"),  # type: ignore[arg-type]
        ),
    )


class RequestTimer:
    """Observes one generation's latencies as its outputs arrive (replica side)."""

    __slots__ = ("model", "started_at", "last_at", "last_num_tokens", "is_finished")

    def __init__(self, model: str) -> None:
        self.model = model
        self.started_at = time.monotonic()
        self.last_at: float | None = None
        self.last_num_tokens = 0
        self.is_finished = False

    def observe(self, output: RequestOutput) -> None:
        metrics, tags, now = serve_metrics(), {"model": self.model}, time.monotonic()
        if self.last_at is None:
            metrics.time_to_first_token.observe(now - self.started_at, tags)
            metrics.queue_time.observe(output.queue_time_s, tags)
        elif output.num_generated_tokens > self.last_num_tokens:
            gap = (now - self.last_at) / (output.num_generated_tokens - self.last_num_tokens)
            metrics.inter_token_latency.observe(gap, tags)
        self.last_at, self.last_num_tokens = now, output.num_generated_tokens
        if output.finish_reason is not None:
            self._finish(output, now)

    def _finish(self, output: RequestOutput, now: float) -> None:
        metrics, tags = serve_metrics(), {"model": self.model}
        self.is_finished = True
        metrics.e2e_latency.observe(now - self.started_at, tags)
        metrics.prompt_tokens.inc(output.num_prompt_tokens, tags)
        if output.num_generated_tokens > 0:  # Ray's Counter refuses 0 (a failed prefill)
            metrics.generation_tokens.inc(output.num_generated_tokens, tags)
        reason = str(output.finish_reason)
        if reason in SUCCESS_REASONS:
            metrics.request_success.inc(1, {**tags, "finished_reason": reason})
        elif reason == "abort":  # aborted in the engine: the ingress gave up or the client left
            metrics.request_cancelled.inc(1, tags)
        # "error": the ingress counts it in request_errors with the status it answered

    def cancelled(self) -> None:
        serve_metrics().request_cancelled.inc(1, {"model": self.model})


def record_engine_stats(model: str, stats: EngineStats) -> None:
    metrics, tags = serve_metrics(), {"model": model}
    metrics.num_running.set(stats.num_running, tags)
    metrics.num_waiting.set(stats.num_waiting, tags)


def record_error(model: str, status: int) -> None:
    serve_metrics().request_errors.inc(1, {"model": model, "status": str(status)})
