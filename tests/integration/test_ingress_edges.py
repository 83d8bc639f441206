"""A service of SmolLM2 alone with tiny limits (2 running, 2 queued) and an API key: /health and
/v1/models answer at once while the replica is saturated, auth answers before the body is read,
and unknown paths are 404 through the real front (HAProxy, as `make run` has it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import yaml

from serve_app.config import model_entries, with_models
from tests.conftest import SERVE_CONFIG, running_service

pytestmark = pytest.mark.integration

API_KEY = "sk-test-edges"
CHAT_MODEL = "smollm2-135m-instruct"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
NUM_RUNNING, NUM_QUEUED = 2, 2
LONG_ASK = [{"role": "user", "content": "Write a very long story about the sea."}]


def small_limits_config() -> dict:
    config = with_models(yaml.safe_load(SERVE_CONFIG.read_text()), {CHAT_MODEL})
    chat = model_entries(config)[CHAT_MODEL]
    chat["engine"].update(max_num_seqs=NUM_RUNNING, torch_threads=1)
    chat["deployment"].update(max_ongoing_requests=NUM_RUNNING, max_queued_requests=NUM_QUEUED)
    ingress = next(a["args"] for a in config["applications"] if "ingress" in a["args"])
    ingress["ingress"]["api_keys"] = [API_KEY]
    return config


@pytest.fixture(scope="module")
def edges_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("edges")
    with running_service(workdir, "edges", small_limits_config()) as url:
        yield url


class LongStream(threading.Thread):
    """An ignore_eos stream that holds a slot (or a queue place) until `stop` is set."""

    def __init__(self, url: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, stop
        self.has_tokens = threading.Event()

    def run(self) -> None:
        body = {
            "model": CHAT_MODEL,
            "messages": LONG_ASK,
            "max_tokens": 4000,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream(
            "POST", f"{self.url}/v1/chat/completions", json=body, headers=HEADERS, timeout=300
        ) as response:
            for line in response.iter_lines():
                if '"content"' in line:
                    self.has_tokens.set()
                if self.stop.is_set():
                    return  # closing the stream cancels the generation


def _saturate(url: str, stop: threading.Event) -> list[LongStream]:
    running = [LongStream(url, stop) for _ in range(NUM_RUNNING)]
    for stream in running:
        stream.start()
    for stream in running:
        assert stream.has_tokens.wait(120), "a long stream never started"
    queued = [LongStream(url, stop) for _ in range(NUM_QUEUED)]
    for stream in queued:
        stream.start()
    time.sleep(1.0)  # the queued ones reach the router's queue
    return running + queued


def test_health_and_models_answer_while_the_model_is_saturated(edges_url: str) -> None:
    stop = threading.Event()
    streams = _saturate(edges_url, stop)
    try:
        # Saturated for real: one more generation is refused at once.
        body = {"model": CHAT_MODEL, "messages": LONG_ASK, "max_tokens": 2}
        refused = httpx.post(
            f"{edges_url}/v1/chat/completions", json=body, headers=HEADERS, timeout=30
        )
        assert refused.status_code == 429, refused.text
        for _ in range(5):
            started = time.monotonic()
            health = httpx.get(f"{edges_url}/health", timeout=10)
            models = httpx.get(f"{edges_url}/v1/models", headers=HEADERS, timeout=10)
            elapsed = time.monotonic() - started
            assert health.status_code == 200, health.text
            assert [m["status"] for m in models.json()["data"]] == ["ready"], models.text
            assert elapsed < 2.0, f"/health and /v1/models took {elapsed:.2f} s"
            time.sleep(0.5)
    finally:
        stop.set()
        for stream in streams:
            stream.join(timeout=60)


def test_unauthenticated_huge_or_invalid_body_is_401(edges_url: str) -> None:
    url = f"{edges_url}/v1/chat/completions"
    huge = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    for body in (huge, {"model": 1, "temperature": "hot"}):
        response = httpx.post(url, json=body, timeout=60)
        assert response.status_code == 401, response.text[:300]
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    # h11 refuses to send "Bearer " (trailing space); the unit tests send that one.
    blank = httpx.get(f"{edges_url}/v1/models", headers={"Authorization": "Bearer"})
    assert blank.status_code == 401


def test_unknown_paths_are_404_in_the_openai_shape(edges_url: str) -> None:
    for method, path in (("GET", "/%00"), ("POST", "/v1/assistants"), ("GET", "/v1/nothing")):
        response = httpx.request(method, f"{edges_url}{path}", headers=HEADERS, json={})
        assert response.status_code == 404, (method, path, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
