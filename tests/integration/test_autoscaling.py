"""Autoscaling shown, not just configured: sustained streaming load makes Serve add a SmolLM2
replica (seen in Serve's status and in the engine stats of two distinct processes), and the
deployment scales back to one replica when the load stops.

The measured times are printed and written to test-output/autoscaling.json (docs/operations.md).
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serve_app.config import ingress_deployment, model_entries, with_models
from serve_app.sse import DONE, iter_data
from tests.conftest import OUTPUT_DIR, SERVE_CONFIG, running_service
from tests.integration.ray_cluster import deployment_status

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "smollm2-135m-instruct"
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 2,
    "downscale_delay_s": 8,
    "metrics_interval_s": 1,
    "look_back_period_s": 2,
}
NUM_CLIENTS = 8  # 8 ongoing requests / target 2 per replica: Serve wants 4, capped at 2
MAX_TOKENS = 64
# Bounds, generous for a shared 2-core machine; the phases end as soon as their goal is seen.
MAX_LOAD_S = 150
MAX_SCALE_DOWN_S = 120


def autoscaling_config() -> dict[str, Any]:
    """config/serve.yaml with SmolLM2 only, sized so that two replicas fit on 2 CPUs."""
    config = with_models(yaml.safe_load(SERVE_CONFIG.read_text()), {MODEL})
    model = model_entries(config)[MODEL]
    model["engine"].update(max_num_seqs=4, torch_threads=1, default_max_tokens=MAX_TOKENS)
    model["deployment"].update(
        ray_actor_options={"num_cpus": 0.3, "num_gpus": 0},
        # Above the load, so the stats probes below are never queued behind generations.
        max_ongoing_requests=16,
        max_queued_requests=64,
        autoscaling_config=AUTOSCALING,
    )
    ingress_deployment(config)["ray_actor_options"] = {"num_cpus": 0.1}
    return config


@dataclass
class Load:
    """NUM_CLIENTS threads, each streaming chat completions back to back until stopped."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    num_completed: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index in range(NUM_CLIENTS):
            thread = threading.Thread(target=self._client, args=(index,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()  # open streams are closed by their clients: a disconnect frees the slot
        for thread in self.threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "a load client did not stop"

    def _client(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self.stop.is_set():
                try:
                    outcome = self._one_stream(client, index)
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                with self.lock:
                    if outcome == "done":
                        self.num_completed += 1
                    elif outcome != "stopped":
                        self.errors.append(outcome)

    def _one_stream(self, client: httpx.Client, index: int) -> str:
        body = {
            "model": MODEL,
            "stream": True,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.8,
            "seed": index,
            "messages": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
        }
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return f"HTTP {response.status_code}: {response.read()[:200]!r}"
            for data in iter_data(response.iter_lines()):
                if self.stop.is_set():
                    return "stopped"
                if data.startswith('{"error"'):
                    return data
                if data == DONE:
                    return "done"
        return "the stream ended without [DONE]"


def replica_states(url: str) -> dict[str, int]:
    """The model's replicas by state, from Serve's status (GET /admin/status)."""
    response = httpx.get(f"{url}/admin/status", timeout=30)
    response.raise_for_status()
    states: dict[str, int] = deployment_status(response.json(), MODEL)["replicas"]
    return {state: count for state, count in states.items() if count}


def engine_stats(url: str) -> dict[str, Any]:
    """The engine stats of whichever replica the ingress's handle routed this call to."""
    response = httpx.get(f"{url}/admin/models/{MODEL}/stats", timeout=30)
    response.raise_for_status()
    stats: dict[str, Any] = response.json()
    return stats


def has_grown(samples: list[int]) -> bool:
    return len(samples) >= 2 and max(samples) > samples[0]


def test_load_adds_a_replica_that_takes_traffic_and_it_goes_when_the_load_stops(
    tmp_path: Path,
) -> None:
    with running_service(tmp_path, "autoscaling", autoscaling_config()) as url:
        assert replica_states(url) == {"RUNNING": 1}
        timings: dict[str, float] = {}
        finished_by_pid: dict[int, list[int]] = defaultdict(list)
        load = Load(url)
        started = time.monotonic()
        load.start()
        try:
            while time.monotonic() - started < MAX_LOAD_S:
                states = replica_states(url)
                if "replica_added_s" not in timings and sum(states.values()) == 2:
                    timings["replica_added_s"] = time.monotonic() - started  # Serve decided
                if "running_2_s" not in timings and states.get("RUNNING") == 2:
                    timings["running_2_s"] = time.monotonic() - started  # and it started
                for _ in range(4):  # a few probes per status poll: each lands on one replica
                    stats = engine_stats(url)
                    finished_by_pid[stats["pid"]].append(stats["num_finished"])
                grown = [pid for pid, samples in finished_by_pid.items() if has_grown(samples)]
                if "running_2_s" in timings and len(grown) == 2:
                    timings["both_serving_s"] = time.monotonic() - started
                    break
                time.sleep(0.5)
        finally:
            load.finish()
        stopped = time.monotonic()

        summary = {pid: (s[0], max(s), len(s)) for pid, s in finished_by_pid.items()}
        assert "running_2_s" in timings, f"never 2 RUNNING replicas in {MAX_LOAD_S}s: {summary}"
        assert "both_serving_s" in timings, (
            f"traffic did not reach two replicas in {MAX_LOAD_S}s; "
            f"pid -> (first num_finished, last, samples): {summary}"
        )
        assert load.errors == [], f"requests failed under load: {load.errors[:5]}"
        assert load.num_completed > 0

        # No traffic: after downscale_delay_s Serve stops the extra replica.
        while time.monotonic() - stopped < MAX_SCALE_DOWN_S:
            if replica_states(url) == {"RUNNING": 1}:
                timings["back_to_1_s"] = time.monotonic() - stopped
                break
            time.sleep(1)
        assert "back_to_1_s" in timings, f"still {replica_states(url)} after {MAX_SCALE_DOWN_S}s"
        assert len({engine_stats(url)["pid"] for _ in range(6)}) == 1

    record = {
        "autoscaling_config": AUTOSCALING,
        "clients": NUM_CLIENTS,
        "max_tokens": MAX_TOKENS,
        "completed_requests": load.num_completed,
        "num_finished_by_pid": summary,
        **{k: round(v, 1) for k, v in timings.items()},
    }
    OUTPUT_DIR.mkdir(exist_ok=True)
    (OUTPUT_DIR / "autoscaling.json").write_text(json.dumps(record, indent=2))
    print("autoscaling:", json.dumps(record))
