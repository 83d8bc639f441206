"""Prometheus metrics move with real traffic: scraped from Ray's metrics export endpoint."""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
WATCHED = {
    "ray_serve_app_time_to_first_token_seconds_count": {},
    "ray_serve_app_inter_token_latency_seconds_count": {},
    "ray_serve_app_e2e_request_latency_seconds_count": {},
    "ray_serve_app_request_queue_time_seconds_count": {},
    "ray_serve_app_prompt_tokens_total": {},
    "ray_serve_app_generation_tokens_total": {},
    "ray_serve_app_request_success_total": {},
    "ray_serve_app_request_cancelled_total": {},
    "ray_serve_app_request_errors_total": {"status": "400"},
}


def scrape(service_url: str) -> dict[str, float]:
    targets = httpx.get(f"{service_url}/admin/metrics-targets", timeout=10).json()["targets"]
    totals = dict.fromkeys(WATCHED, 0.0)
    for target in targets:
        port = urlsplit(f"//{target}").port
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text  # same machine
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                wanted = WATCHED.get(sample.name)
                if wanted is None or sample.labels.get("model") != MODEL:
                    continue
                if all(sample.labels.get(k) == v for k, v in wanted.items()):
                    totals[sample.name] += sample.value
    return totals


def traffic(service_url: str) -> None:
    url = f"{service_url}/v1/chat/completions"
    ask = [{"role": "user", "content": "Tell me about the moon."}]
    for _ in range(2):
        body = {"model": MODEL, "messages": ask, "max_tokens": 8, "stream": True}
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            list(response.iter_lines())
    body = {"model": MODEL, "messages": ask, "max_tokens": 300, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i > 4:
                break  # cancelled by the client
    # A 400 raised once the model is known (validation errors before that are model="none").
    too_long = {"model": MODEL, "messages": ask, "max_tokens": 100_000}
    assert httpx.post(url, json=too_long).status_code == 400


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after[f"ray_serve_app_{name}"] - before[f"ray_serve_app_{name}"]


def test_metrics_move_with_traffic(service_url: str) -> None:
    before = scrape(service_url)
    traffic(service_url)
    deadline = time.monotonic() + 90  # Ray exports metrics every few seconds
    while time.monotonic() < deadline:
        after = scrape(service_url)
        moved = {name: after[name] > before[name] for name in WATCHED}
        # Each process exports on its own clock, and an earlier test's cancel can land late:
        # wait for this traffic's two successes too, not just for every counter to move.
        if all(moved.values()) and _delta(before, after, "request_success_total") >= 2:
            break
        time.sleep(2)
    assert all(moved.values()), {n: (before[n], after[n]) for n in WATCHED}
    assert (
        after["ray_serve_app_request_success_total"] - before["ray_serve_app_request_success_total"]
        >= 2
    )
    assert (
        after["ray_serve_app_generation_tokens_total"]
        - before["ray_serve_app_generation_tokens_total"]
        >= 2
    )
