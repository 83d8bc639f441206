"""The engine process on the real service: killed mid-stream it fails the stream with an error
event and Ray replaces the replica (check_health fails); a SIGKILLed replica leaves no engine
process behind."""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import pytest

from tests.integration.test_faults import CHAT_MODEL, STORY, read_stream, stats, wait_until
from tests.processes import is_running

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(os.environ.get("SERVE_APP_URL")),
        reason="kills processes: only on a service the tests started",
    ),
]

ENDLESS = {
    "model": CHAT_MODEL,
    "messages": STORY,
    "max_tokens": 800,
    "ignore_eos": True,  # still running when its engine is killed
    "stream": True,
}


def healthy_again(url: str, old_pid: int) -> bool:
    def replaced() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=5).status_code == 200 and (
                stats(url)["pid"] != old_pid
            )
        except (httpx.HTTPError, KeyError, ValueError):
            return False

    return wait_until(replaced, 240, 1)


def start_stream(url: str) -> tuple[threading.Thread, list[str]]:
    events: list[str] = []
    started = threading.Event()
    thread = threading.Thread(
        target=read_stream, args=(url, "/v1/chat/completions", ENDLESS, events, started)
    )
    thread.start()
    assert started.wait(60)
    return thread, events


def test_killed_engine_process_fails_the_stream_and_the_replica_is_replaced(
    service_url: str,
) -> None:
    before = stats(service_url)
    assert before["engine_pid"] != before["pid"]  # the engine runs in a process of its own
    thread, events = start_stream(service_url)
    os.kill(before["engine_pid"], signal.SIGKILL)  # a process of the service this session started
    thread.join(timeout=60)
    assert not thread.is_alive(), "the stream was left hanging"
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert "engine" in error["message"]
    # check_health fails, so Ray replaces the replica; then requests succeed again.
    assert healthy_again(service_url, before["pid"])
    reply = httpx.post(
        f"{service_url}/v1/chat/completions",
        json={"model": CHAT_MODEL, "messages": STORY, "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text


def test_sigkill_of_the_replica_leaves_no_orphan_engine_process(service_url: str) -> None:
    before = stats(service_url)
    assert is_running(before["engine_pid"])
    thread, _ = start_stream(service_url)
    os.kill(before["pid"], signal.SIGKILL)  # the replica, mid-stream
    assert wait_until(lambda: not is_running(before["engine_pid"]), 15, 0.1), (
        "the engine process outlived its replica"
    )
    thread.join(timeout=120)
    assert not thread.is_alive(), "the stream was left hanging"
    assert healthy_again(service_url, before["pid"])
    assert is_running(stats(service_url)["engine_pid"])
