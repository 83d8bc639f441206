"""Prefix-affinity routing on a real service: SmolLM2 at two replicas, each conversation's next
turn reaches the replica whose prefix cache holds its first turn (each engine's own counter of
prompt tokens taken from the cache), and new conversations are spread over both replicas.

Serve's default router (power of two choices) sent a next turn to the other replica half of the
time: the chance that all CONVERSATIONS next turns found their cache without this router is
0.5^12.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import yaml

from deployments.prefix_router import PREFIX_ROUTER_CONFIG
from serve_app.config import ingress_deployment, model_entries, with_models
from tests.conftest import SERVE_CONFIG, running_service

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "smollm2-135m-instruct"
CONVERSATIONS = 12
BLOCK_TOKENS = 8  # a hit reaches at least the whole 8-token blocks (engine/prefix_cache.py)
COLORS = ["red", "green", "blue", "yellow", "white"]


def two_replica_config() -> dict[str, Any]:
    """config/serve.yaml with SmolLM2 only, at two one-thread replicas."""
    config = with_models(yaml.safe_load(SERVE_CONFIG.read_text()), {MODEL})
    model = model_entries(config)[MODEL]
    model["engine"].update(max_num_seqs=4, torch_threads=1)
    model["deployment"].update(
        ray_actor_options={"num_cpus": 0.3, "num_gpus": 0},
        autoscaling_config={"min_replicas": 2, "max_replicas": 2},
        request_router_config=PREFIX_ROUTER_CONFIG,
    )
    ingress_deployment(config)["ray_actor_options"] = {"num_cpus": 0.1}
    return config


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("prefix_routing")
    with running_service(workdir, "prefix_routing", two_replica_config()) as service_url:
        yield service_url


def stats_by_pid(url: str) -> dict[int, dict[str, Any]]:
    """Both replicas' engine stats (each call reaches one replica: called until both answered)."""
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(60):
        response = httpx.get(f"{url}/admin/models/{MODEL}/stats", timeout=30)
        response.raise_for_status()
        stats = response.json()
        seen[stats["pid"]] = stats
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only replicas {sorted(seen)} answered 60 stats calls")


def cached_tokens(url: str) -> dict[int, int]:
    return {pid: s["num_cached_prompt_tokens"] for pid, s in stats_by_pid(url).items()}


def test_next_turns_reach_the_replica_holding_their_prefix(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    start = stats_by_pid(url)
    misses = []
    for number in range(CONVERSATIONS):
        notes = " ".join(
            f"Note {number}.{i}: box {i} is {COLORS[(number + i) % 5]}." for i in range(12)
        )
        first = [{"role": "user", "content": f"{notes}\nWhat color is box 3?"}]
        answer = client.chat.completions.create(
            model=MODEL, messages=first, temperature=0, max_tokens=8
        )
        assert answer.usage is not None
        next_turn = [
            *first,
            {"role": "assistant", "content": answer.choices[0].message.content or ""},
            {"role": "user", "content": "And box 4?"},
        ]
        before = cached_tokens(url)
        client.chat.completions.create(model=MODEL, messages=next_turn, temperature=0, max_tokens=8)
        after = cached_tokens(url)
        reused = sum(after[pid] - before[pid] for pid in after)
        whole_first_turn = answer.usage.prompt_tokens // BLOCK_TOKENS * BLOCK_TOKENS
        if reused < whole_first_turn:
            misses.append((number, reused, answer.usage.prompt_tokens))
    assert not misses, f"next turns that missed their prefix (n, reused, first prompt): {misses}"

    end = stats_by_pid(url)
    served = {pid: end[pid]["num_finished"] - start[pid]["num_finished"] for pid in end}
    assert all(count >= 2 for count in served.values()), f"requests by replica: {served}"
