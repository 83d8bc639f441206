"""Live config changes with `serve deploy` on a running cluster of our own: while a long SmolLM2
stream is open, a new config that adds the embedding model, then one that changes only the
embedding model's engine options, are deployed. The stream must end normally without a pause,
the SmolLM2 replica must be the same process, and the change must be in effect.

Measured times are printed and written to test-output/live_config.json (docs/operations.md).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import yaml

from serve_app.config import model_entries, with_models
from tests.conftest import OUTPUT_DIR, SERVE_CONFIG
from tests.integration.chat_stream import Stream
from tests.integration.ray_cluster import (
    PrivateCluster,
    deployment_status,
    is_settled,
    private_cluster,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
# The stream must stay open this long after Serve starts applying the change: longer than
# Serve's default graceful_shutdown_timeout_s (20 s), after which a stopping replica is killed.
MIN_OVERLAP_S = 25.0
STREAM_TARGET_S = 80.0  # max_tokens is sized from the measured token rate to last about this
MAX_CHANGE_S = 420.0
RECORDS: list[dict[str, Any]] = []


def both_models() -> dict[str, Any]:
    """config/serve.yaml with SmolLM2 and MiniLM, one inference thread each (2-core machine)."""
    config = with_models(yaml.safe_load(SERVE_CONFIG.read_text()), {CHAT, EMBED})
    models = model_entries(config)
    models[CHAT]["engine"].update(torch_threads=1, max_num_seqs=4)
    models[EMBED]["engine"].update(torch_threads=1)
    return config


def chat_only() -> dict[str, Any]:
    return with_models(both_models(), {CHAT})


def smaller_embedding_batches() -> dict[str, Any]:
    """Only the embedding model changes: a new engine max_batch_size."""
    config = both_models()
    engine = model_entries(config)[EMBED]["engine"]
    engine["max_batch_size"] = engine.get("max_batch_size", 32) // 2
    return config


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    """A private one-node cluster serving SmolLM2 alone, deployed with `serve deploy`."""
    with private_cluster(num_cpus=2) as running:
        config = chat_only()
        running.deploy(config, "chat-only")
        running.wait_settled(config, timeout_s=300)
        wait_healthy(running.http_url)
        yield running
    OUTPUT_DIR.mkdir(exist_ok=True)
    (OUTPUT_DIR / "live_config.json").write_text(json.dumps(RECORDS, indent=2))


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}/health not 200 after {timeout_s}s")


def chat_pid(url: str) -> int:
    response = httpx.get(f"{url}/admin/models/{CHAT}/stats", timeout=30)
    response.raise_for_status()
    return int(response.json()["pid"])


def tokens_per_second(url: str) -> float:
    """SmolLM2's decode rate right now, from a short greedy completion."""
    started = time.monotonic()
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": CHAT,
            "temperature": 0,
            "max_tokens": 32,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        },
        timeout=120,
    )
    response.raise_for_status()
    return float(response.json()["usage"]["completion_tokens"]) / (time.monotonic() - started)


def replica_snapshot(apps: dict[str, Any]) -> dict[str, list[tuple[str, str]]]:
    """Deployment -> its (replica_id, state) pairs, from Serve's REST API (`apps`)."""
    return {
        name: sorted((r["replica_id"], r["state"]) for r in deployment["replicas"])
        for app in apps.values()
        for name, deployment in app["deployments"].items()
    }


def replica_ids(snapshot: dict[str, list[tuple[str, str]]], deployment: str) -> set[str]:
    return {replica_id for replica_id, _ in snapshot.get(deployment, [])}


@dataclass
class Change:
    """What happened around one `serve deploy` made while a SmolLM2 stream was open."""

    stream: Stream
    before: dict[str, list[tuple[str, str]]]
    after: dict[str, list[tuple[str, str]]]
    pid_before: int
    pid_after: int
    timings: dict[str, float]

    def problems(self) -> list[str]:
        found = self.stream.problems()
        if replica_ids(self.after, CHAT) != replica_ids(self.before, CHAT):
            found.append(
                f"the {CHAT} replicas changed: {self.before.get(CHAT)} -> {self.after.get(CHAT)}"
            )
        if self.pid_after != self.pid_before:
            found.append(
                f"the {CHAT} replica was restarted (pid {self.pid_before} -> {self.pid_after}; "
                f"replicas {self.before.get(CHAT)} -> {self.after.get(CHAT)})"
            )
        overlap = self.timings["stream_end_s"] - self.timings["change_seen_s"]
        if overlap < MIN_OVERLAP_S and self.timings["stream_end_s"] < self.timings["settled_s"]:
            found.append(
                f"inconclusive: the stream ended {overlap:.1f}s after the change began, before "
                f"the roll-out finished (needs {MIN_OVERLAP_S}s)"
            )
        return found


def deploy_during_stream(cluster: PrivateCluster, config: dict[str, Any], name: str) -> Change:
    """`serve deploy` of `config` while a long SmolLM2 stream is open; waits for both to end."""
    url = cluster.http_url
    rate = tokens_per_second(url)
    # Long enough to outlast the roll-out at today's rate (1,000 tokens took ~21 s once the
    # decode step was in C), to its max_tokens whatever the story's end.
    max_tokens = max(300, min(4000, int(rate * STREAM_TARGET_S)))
    stream = Stream(url, max_tokens=max_tokens, ignore_eos=True)
    before, pid_before = replica_snapshot(cluster.applications()), chat_pid(url)
    stream.start()
    deadline = time.monotonic() + 120
    while stream.num_content_events() < 10 and not stream.is_done:
        assert time.monotonic() < deadline, "the stream did not start"
        time.sleep(0.2)
    started = time.monotonic()
    cluster.deploy(config, name)
    timings = {"deploy_cli_s": time.monotonic() - started}
    timings.update(watch_rollout(cluster, config, before, stream, started))
    wait_healthy(url)
    after = replica_snapshot(cluster.applications())
    change = Change(stream, before, after, pid_before, chat_pid(url), timings)
    record = {
        "change": name,
        "max_tokens": stream.max_tokens,
        "tokens_per_s": round(rate, 1),
        "max_gap_s": round(stream.max_gap_s(), 2),
        "pids": [change.pid_before, change.pid_after],
        "replaced": sorted(d for d in after if set(after[d]) != set(before.get(d, []))),
        **{k: round(v, 1) for k, v in timings.items()},
        "problems": change.problems(),
    }
    RECORDS.append(record)
    print("live config:", json.dumps(record))
    return change


def watch_rollout(
    cluster: PrivateCluster,
    config: dict[str, Any],
    before: dict[str, list[tuple[str, str]]],
    stream: Stream,
    started: float,
) -> dict[str, float]:
    """Seconds from the deploy until Serve began the change, stopped a first old replica,
    settled, and until the stream ended."""
    timings: dict[str, float] = {}
    while not ("settled_s" in timings and stream.is_done):
        assert time.monotonic() - started < MAX_CHANGE_S, f"not settled in {MAX_CHANGE_S}s"
        apps = cluster.applications()
        is_changing = replica_snapshot(apps) != before or any(
            app["status"] != "RUNNING" for app in apps.values()
        )
        if is_changing and "change_seen_s" not in timings:
            timings["change_seen_s"] = time.monotonic() - started
        is_stopping = any(s == "STOPPING" for rs in replica_snapshot(apps).values() for _, s in rs)
        if is_stopping and "stopping_seen_s" not in timings:
            timings["stopping_seen_s"] = time.monotonic() - started  # an old replica drains
        if "change_seen_s" in timings and "settled_s" not in timings and is_settled(apps, config):
            timings["settled_s"] = time.monotonic() - started
        time.sleep(0.5)
    assert stream.thread is not None
    stream.thread.join(timeout=30)
    timings["stream_end_s"] = stream.ended_at - started
    return timings


def admin_status(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/admin/status", timeout=30)
    response.raise_for_status()
    status: dict[str, Any] = response.json()
    return status


def embed(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json={"model": EMBED, "input": "hi"}, timeout=60)


def embedding_dims(url: str) -> int:
    response = embed(url)
    assert response.status_code == 200, response.text
    return len(response.json()["data"][0]["embedding"])


def test_adding_a_model_leaves_an_open_stream_and_its_replica_alone(
    cluster: PrivateCluster,
) -> None:
    assert embed(cluster.http_url).status_code == 404
    change = deploy_during_stream(cluster, both_models(), "add-embedding")

    models = httpx.get(f"{cluster.http_url}/v1/models", timeout=30).json()["data"]
    assert {m["id"] for m in models} == {CHAT, EMBED}
    assert embedding_dims(cluster.http_url) == 384
    assert deployment_status(admin_status(cluster.http_url), EMBED)["replicas"] == {"RUNNING": 1}
    problems = change.problems()
    assert not problems, "\n".join(problems)


def test_changing_only_the_embedding_model_leaves_the_chat_model_alone(
    cluster: PrivateCluster,
) -> None:
    if embed(cluster.http_url).status_code != 200:  # run alone: deploy the starting point first
        cluster.deploy(both_models(), "both")
        cluster.wait_settled(both_models())
        wait_healthy(cluster.http_url)
    config = smaller_embedding_batches()
    change = deploy_during_stream(cluster, config, "embedding-batch-size")

    # In effect: Serve runs the new engine options and replaced the embedding replica.
    deployed = {"applications": [a["deployed_app_config"] for a in cluster.applications().values()]}
    new_size = model_entries(config)[EMBED]["engine"]["max_batch_size"]
    assert model_entries(deployed)[EMBED]["engine"]["max_batch_size"] == new_size
    assert replica_ids(change.after, EMBED).isdisjoint(replica_ids(change.before, EMBED))
    assert embedding_dims(cluster.http_url) == 384
    problems = change.problems()
    assert not problems, "\n".join(problems)


def test_a_serve_level_override_of_a_lightweight_option_restarts_nothing(
    cluster: PrivateCluster,
) -> None:
    """Options Serve updates in place (max_ongoing_requests, ...) are set in the Serve config's
    `deployments:` list of the application holding the model, not in our `args`."""
    apps = cluster.applications()
    config = yaml.safe_load(SERVE_CONFIG.read_text())  # proxy and HTTP options as deployed
    config["applications"] = [copy.deepcopy(a["deployed_app_config"]) for a in apps.values()]
    new_limit = model_entries(config)[CHAT]["deployment"]["max_ongoing_requests"] // 2
    holder = next(
        app for app in config["applications"] if CHAT in model_entries({"applications": [app]})
    )
    holder["deployments"] = [{"name": CHAT, "max_ongoing_requests": new_limit}]
    before = replica_snapshot(apps)
    started = time.monotonic()
    cluster.deploy(config, "override-max-ongoing")

    def applied() -> bool:
        deployments = cluster.applications()[holder["name"]]["deployments"]
        return bool(deployments[CHAT]["deployment_config"]["max_ongoing_requests"] == new_limit)

    deadline = started + 120
    while not applied():
        assert time.monotonic() < deadline, "the override was not applied in 120s"
        time.sleep(0.5)
    applied_s = round(time.monotonic() - started, 1)
    RECORDS.append({"change": "override-max-ongoing", "applied_s": applied_s})
    cluster.wait_settled(config)
    assert replica_snapshot(cluster.applications()) == before, "a replica was restarted"
