"""A real two-node Ray cluster on this machine (scripts/multinode_demo.sh): one model pinned to
the second node serves through the head's proxy, and everything started is stopped after."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.ray_cluster import session_members

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "multinode_demo.sh"
WORKER_MODEL = "smollm2-135m-instruct"
HEAD_MODEL = "all-minilm-l6-v2"
PARIS: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


def read_env(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def run_step(step: str, env: dict[str, str], timeout_s: float) -> None:
    result = subprocess.run(
        [str(SCRIPT), step],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert result.returncode == 0, f"{step} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """The demo's cluster, up and deployed; its state (ports, token, URLs) as a dict."""
    # A short folder: Ray's unix socket paths under it must stay under 108 characters.
    state = Path(tempfile.mkdtemp(prefix="serve-app-mn-", dir="/tmp"))
    env = {**os.environ, "MULTINODE_DIR": str(state), "STEP_TIMEOUT_S": "150"}
    sessions: list[int] = []
    try:
        run_step("up", env, timeout_s=120)
        sessions = [int((state / f"{name}.pid").read_text()) for name in ("head", "worker")]
        run_step("deploy", env, timeout_s=170)
        yield read_env(state / "cluster.env")
    finally:
        try:
            subprocess.run([str(SCRIPT), "down"], env=env, cwd=REPO_ROOT, timeout=90, check=False)
        finally:
            left = [pid for session in sessions for pid in session_members(session)]
            for pid in left:  # only processes of the sessions this test started
                os.kill(pid, 9)
            shutil.rmtree(state, ignore_errors=True)
        assert left == [], f"processes left running after `down`: {left}"


def replica_nodes(cluster: dict[str, str]) -> tuple[dict[str, set[str]], dict[str, str]]:
    """Deployment -> node ids of its replicas, and node id -> role (Serve's REST API)."""
    base = cluster["DASHBOARD_URL"]
    headers = {"Authorization": f"Bearer {cluster['RAY_AUTH_TOKEN']}"}
    nodes = httpx.get(f"{base}/api/v0/nodes", params={"detail": 1}, headers=headers, timeout=30)
    nodes.raise_for_status()
    roles = {}
    for node in nodes.json()["data"]["result"]["result"]:
        if node["state"] == "ALIVE":
            (role,) = {"head_node", "worker_node"} & set(node["resources_total"])
            roles[node["node_id"]] = role
    apps = httpx.get(f"{base}/api/serve/applications/", headers=headers, timeout=30)
    apps.raise_for_status()
    placement = {  # one application per model plus the ingress's; deployment names are unique
        name: {r["node_id"] for r in d["replicas"] if r["state"] == "RUNNING"}
        for app in apps.json()["applications"].values()
        for name, d in app["deployments"].items()
    }
    return placement, roles


def test_a_model_pinned_to_the_second_node_serves_through_the_head(
    cluster: dict[str, str],
) -> None:
    placement, roles = replica_nodes(cluster)
    assert sorted(roles.values()) == ["head_node", "worker_node"], "two raylets, two roles"
    assert {roles[n] for n in placement[WORKER_MODEL]} == {"worker_node"}
    assert {roles[n] for n in placement[HEAD_MODEL]} == {"head_node"}
    assert {roles[n] for n in placement["Ingress"]} == {"head_node"}

    # Proxy and ingress on the head, the model's engine on the second node: streamed and
    # non-streamed greedy answers agree across the node boundary.
    client = openai.OpenAI(base_url=f"{cluster['HTTP_URL']}/v1", api_key="unused", max_retries=0)
    whole = client.chat.completions.create(
        model=WORKER_MODEL,
        messages=PARIS,
        temperature=0,
        max_tokens=16,
    )
    text = whole.choices[0].message.content or ""
    assert "Paris" in text
    stream = client.chat.completions.create(
        model=WORKER_MODEL,
        messages=PARIS,
        temperature=0,
        max_tokens=16,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    embedding = client.embeddings.create(model=HEAD_MODEL, input="hello").data[0].embedding
    assert len(embedding) == 384


def test_the_cluster_refuses_callers_without_its_token(cluster: dict[str, str]) -> None:
    unauthenticated = httpx.get(f"{cluster['DASHBOARD_URL']}/api/serve/applications/", timeout=30)
    assert unauthenticated.status_code == 401
