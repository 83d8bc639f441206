"""Served (HTTP, serve run of SmolLM2 alone) of two source trees and the offline engine,
interleaved level by level: one server per tree started once, then per round c=1 and c=16 on
each target in turn. Ratios are medians over rounds of same-round ratios (this VM drifts).

    cd /tmp/engine-after && PYTHONPATH=$PWD /work/main/.venv/bin/python \\
        /work/main/benchmarks/engine_process_ab.py --trees /tmp/engine-before /tmp/engine-after
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml
from peers import targets
from peers.interleaved import http_maker, interleaved_rounds, median_ratio
from peers.loadgen import Quiet
from peers.offline import engine_maker

from serve_app.config import ModelConfig, with_models
from serve_app.ports import free_port

MODEL = targets.SMOLLM2_ID


@contextlib.contextmanager
def served(tree: Path, out: Path) -> Iterator[targets.Server]:
    """`serve run` of the tree's config/serve.yaml with SmolLM2 alone, from that tree."""
    port = free_port()
    config = with_models(yaml.safe_load((tree / "config/serve.yaml").read_text()), {MODEL})
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config_path = out / f"{tree.name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = out / f"{tree.name}.log"
    env = {**targets.child_env(), "PYTHONPATH": str(tree)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            targets.serve_app_run(config_path),
            cwd=tree,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = targets.Server(tree.name, process, f"http://127.0.0.1:{port}", MODEL, log_path)
    try:
        targets.wait_healthy(server, 600)
        yield server
    finally:
        targets.stop(process)


def offline_engine(tree: Path) -> Any:
    from serve_app.loading import build_llm_engine

    apps = yaml.safe_load((tree / "config/serve.yaml").read_text())["applications"]
    args = next(a["args"] for a in apps if a["args"].get("model", {}).get("id") == MODEL)
    model = ModelConfig.model_validate(args["model"])
    return build_llm_engine(model, Path(args["cache_dir"]).expanduser())


async def measure(args: argparse.Namespace, servers: list[targets.Server]) -> list[dict[str, Any]]:
    engine = offline_engine(args.trees[0])
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    timeout = httpx.Timeout(None, connect=10)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=timeout) as client:
        senders = {"offline": engine_maker(engine)}
        sessions = {"offline": Quiet(session_id=None)}  # the engine runs in this process
        for server in servers:
            senders[server.name] = http_maker(client, server)
            sessions[server.name] = Quiet(session_id=server.process.pid)  # its own session
        levels = [(1, args.c1_requests), (16, args.c16_requests)]
        rows = await interleaved_rounds(
            senders, sessions, args.rounds, levels, args.max_tokens, args.level_timeout_s
        )
    engine.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trees", nargs=2, type=Path, required=True, help="before after")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--c1-requests", type=int, default=3)
    parser.add_argument("--c16-requests", type=int, default=16)
    parser.add_argument("--level-timeout-s", type=float, default=180.0)
    parser.add_argument("--out", type=Path, default=Path("results/engine_process_ab"))
    args = parser.parse_args()
    args.trees = [tree.resolve() for tree in args.trees]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with served(args.trees[0], args.out) as before, served(args.trees[1], args.out) as after:
        print(f"both healthy after {time.perf_counter() - started:.0f}s", flush=True)
        rows = asyncio.run(measure(args, [before, after]))
    names = [tree.name for tree in args.trees]
    ratios = {
        f"c{c}": {
            "after/before": median_ratio(rows, names[1], names[0], c),
            "before/offline": median_ratio(rows, names[0], "offline", c),
            "after/offline": median_ratio(rows, names[1], "offline", c),
            "ttft_p50 after/before": median_ratio(rows, names[1], names[0], c, "ttft_p50_s"),
            "ttft_p50 after/offline": median_ratio(rows, names[1], "offline", c, "ttft_p50_s"),
        }
        for c in (1, 16)
    }
    print(json.dumps(ratios, indent=2))
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    (args.out / "engine_process_ab.json").write_text(
        json.dumps({**report, "median_ratios": ratios}, indent=2, default=str)
    )


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
