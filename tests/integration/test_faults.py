"""Faults on the real service: a replica killed mid-stream, and a burst of early cancels."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time

import httpx
import pytest

from serve_app.sse import iter_data

pytestmark = pytest.mark.integration

CHAT_MODEL = "smollm2-135m-instruct"
BASE_MODEL = "gemma-3-270m"
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def stats(url: str, model: str = CHAT_MODEL) -> dict:
    return httpx.get(f"{url}/admin/models/{model}/stats", timeout=30).json()


def wait_until(predicate, timeout_s: float, interval_s: float = 0.2) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def cancel_after_first_token(url: str) -> int:
    body = {"model": CHAT_MODEL, "messages": STORY, "max_tokens": 500, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # leaving the block closes the connection after the first token
        return response.status_code


def test_200_early_cancels_leave_no_request_running(service_url: str) -> None:
    before = stats(service_url)["num_aborted"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        codes = list(pool.map(lambda _: cancel_after_first_token(service_url), range(200)))
    assert codes == [200] * 200
    assert wait_until(lambda: stats(service_url)["num_running"] == 0, timeout_s=30)
    after = stats(service_url)
    assert after["num_waiting"] == 0 and after["running_ids"] == []
    assert after["num_aborted"] - before >= 190  # a few may finish on their own first
    reply = httpx.post(
        f"{service_url}/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": STORY, "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200


def read_stream(
    url: str, path: str, body: dict, events: list[str], started: threading.Event
) -> None:
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=120) as response:
        for data in iter_data(response.iter_lines()):
            events.append(data)
            if len(events) >= 3:
                started.set()


@pytest.mark.skipif(
    bool(os.environ.get("SERVE_APP_URL")),
    reason="kills a replica: only on a service the tests started",
)
def test_replica_killed_mid_stream_ends_with_error_event_and_is_replaced(service_url: str) -> None:
    chat_events: list[str] = []
    base_events: list[str] = []
    chat_started, base_started = threading.Event(), threading.Event()
    chat_body = {
        "model": CHAT_MODEL,
        "messages": STORY,
        "max_tokens": 800,
        "ignore_eos": True,  # still running when its replica is killed
        "stream": True,
    }
    base_body = {
        "model": BASE_MODEL,
        "prompt": "Once upon a time",
        "max_tokens": 60,
        "stream": True,
    }
    threads = [
        threading.Thread(
            target=read_stream,
            args=(service_url, "/v1/chat/completions", chat_body, chat_events, chat_started),
        ),
        threading.Thread(
            target=read_stream,
            args=(service_url, "/v1/completions", base_body, base_events, base_started),
        ),
    ]
    for thread in threads:
        thread.start()
    assert chat_started.wait(60) and base_started.wait(60)
    victim = stats(service_url)["pid"]
    os.kill(victim, signal.SIGKILL)  # a process of the service this test session started
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a stream was left hanging"

    assert chat_events[-1] == "[DONE]"
    error = json.loads(chat_events[-2])["error"]
    assert error["message"] and error["type"]
    # The other model's stream is untouched.
    assert base_events[-1] == "[DONE]"
    base_chunks = [json.loads(e) for e in base_events[:-1]]
    assert all("error" not in c for c in base_chunks)
    assert base_chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    # Ray replaces the replica; then requests succeed again.
    assert wait_until(
        lambda: httpx.get(f"{service_url}/health", timeout=5).status_code == 200, 180, 1
    )
    assert stats(service_url)["pid"] != victim
    reply = httpx.post(
        f"{service_url}/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": STORY, "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
