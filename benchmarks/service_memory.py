"""Memory of every process of the service, after the serving benchmark's load: `make run`'s
config (all three models, HAProxy in front, as serving.py starts it), then serving.py's
warm-up and rounds of streamed chats on SmolLM2 (c=1 and c=16, 64 tokens), then each process
of `serve run`'s session read from /proc/PID/smaps_rollup.

RSS counts a page shared with another process (an engine forked from the zygote shares its
imported torch and transformers) in full in each; PSS counts its share; USS (private clean +
private dirty) is what the process alone holds. The sum of PSS is what the service costs the
machine.

    .venv/bin/python benchmarks/service_memory.py --out /tmp/memory

Run it in two trees (cd TREE && python benchmarks/service_memory.py) to compare a change.
Prints a table; writes service_memory.json. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
sys.path.insert(0, str(REPO_ROOT))

from peers import targets  # noqa: E402
from peers.loadgen import http_sender, run_level  # noqa: E402

from tests.integration.ray_cluster import session_members  # noqa: E402

# serving.py's load: its warm-up, then rounds of (c=1 x 4, c=16 x 32)
WARMUP = ((1, 16, 1), (4, 16, 4))  # (concurrency, max_tokens, requests)
ROUND = ((1, 64, 4), (16, 64, 32))
FIELDS = ("Rss", "Pss", "Private_Clean", "Private_Dirty")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--startup-timeout-s", type=float, default=600.0)
    return parser.parse_args()


async def serve_load(base_url: str, rounds: int) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=300) as client:  # no proxy
        for concurrency, max_tokens, requests in WARMUP + ROUND * rounds:
            send = http_sender(client, base_url, targets.SMOLLM2_ID, max_tokens)
            row = await run_level(send, concurrency, requests, 300)
            if row["num_errors"] or row["num_timed_out"]:
                raise SystemExit(f"load failed at c={concurrency}: {row['error_samples']}")


def process_memory(pid: int) -> dict[str, Any] | None:
    """RSS, PSS and USS in bytes, and the command line; None if the process is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
        command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return None
    kb = {line.split(":")[0]: int(line.split()[1]) for line in rollup}
    return {
        "pid": pid,
        "command": command,
        "rss": kb["Rss"] * 1024,
        "pss": kb["Pss"] * 1024,
        "uss": (kb["Private_Clean"] + kb["Private_Dirty"]) * 1024,
    }


def service_memory(session_id: int) -> list[dict[str, Any]]:
    found = (process_memory(pid) for pid in session_members(session_id))
    return sorted((p for p in found if p is not None), key=lambda p: -p["pss"])


def label(process: dict[str, Any], engine_pid: int) -> str:
    if process["pid"] == engine_pid:
        return "SmolLM2's engine process"
    return process["command"][:60]


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    command, port = targets.serve_app_command(args.out, "serve_memory", None)
    log_path = args.out / "service-memory.log"
    with targets.running(
        "serve-app", command, port, "", log_path, args.startup_timeout_s
    ) as server:
        asyncio.run(serve_load(server.base_url, args.rounds))
        stats = httpx.get(f"{server.base_url}/admin/models/{targets.SMOLLM2_ID}/stats").json()
        engine_pid = int(stats["engine_pid"])
        processes = service_memory(server.process.pid)  # its pid is its session's id
    mb = 2**20
    print(f"{'USS MB':>7} {'PSS MB':>7} {'RSS MB':>7}  process")
    for process in processes[:14]:
        sizes = (process[key] / mb for key in ("uss", "pss", "rss"))
        print("{:7.0f} {:7.0f} {:7.0f}  ".format(*sizes) + label(process, engine_pid))
    total_pss = sum(p["pss"] for p in processes)
    total_rss = sum(p["rss"] for p in processes)
    print(
        f"the service: {len(processes)} processes, PSS {total_pss / mb:.0f} MB in all "
        f"(sum of RSS {total_rss / mb:.0f} MB)"
    )
    result = {
        "command": command,
        "engine_pid": engine_pid,
        "total_pss": total_pss,
        "total_rss": total_rss,
        "processes": processes,
    }
    (args.out / "service_memory.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
