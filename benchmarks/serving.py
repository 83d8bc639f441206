"""Serving benchmark: serve-app vs the servers users would pick instead, and the offline engine.

Streams the same deterministic chat prompts (greedy, fixed max_tokens) through the OpenAI API
of each target and reports output tok/s, TTFT, inter-token latency and end-to-end latency; also
the warm start of the full config/serve.yaml and the SmolLM2 replica's memory. serve-app runs
`make run`'s config (all three models) unless --smollm2-only. Two modes:

- `--rounds N` (N >= 3 for a ratio that counts): every target started once and up together,
  then N interleaved rounds (each level on each target in turn, order reversed every other
  round); ratios are medians of same-round ratios. Peers: llama.cpp's `llama-server` on the
  same GGUF and vLLM's CPU build (both built by benchmarks/build_peers.sh), transformers serve.

      .venv/bin/python benchmarks/serving.py --rounds 3 --concurrency 1 16 --requests-per-level 3

- no --rounds: a sweep, one target at a time (each started and stopped here).

      .venv/bin/python benchmarks/serving.py --out results/serving

Writes JSON (+ PNG for a sweep) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import yaml
from peers import noise, targets
from peers.interleaved import MakeSender, http_maker, interleaved_rounds, median_ratio
from peers.loadgen import Quiet, format_row, http_sender, run_level, run_quietest_level

from serve_app.config import ModelConfig, app_config_from_serve_config
from serve_app.model_store import prepare_weights, resolve_source

HTTP_TARGETS = ("serve-app", "transformers-serve", "naive", "llama-server", "vllm")
ALL_TARGETS = (*HTTP_TARGETS, "offline-engine", "warm-start")
SWEEP_DEFAULT = ("serve-app", "transformers-serve", "naive", "offline-engine", "warm-start")
ROUNDS_DEFAULT = ("serve-app", "llama-server", "vllm", "transformers-serve", "offline-engine")
REFERENCE = "transformers-serve"
REPLICA_PATTERN = "ServeReplica:smollm2-135m-instruct:"  # one Serve app per model
GOALS = {  # name: (what, comparison, threshold)
    "c16_tok_s_vs_transformers": (
        "aggregate tok/s at c=16, serve-app / transformers serve",
        ">=",
        2.5,
    ),
    "c1_tok_s_vs_transformers": ("tok/s at c=1, serve-app / transformers serve", ">=", 2.0),
    "ttft_p50_c16_vs_transformers": ("TTFT p50 at c=16, serve-app / transformers serve", "<=", 1.0),
    "http_vs_offline_c16": ("tok/s at 16, HTTP serve-app / offline engine", ">=", 0.9),
    "warm_start_s": ("warm start of config/serve.yaml to /health 200 (s)", "<=", 30.0),
    "rss_vs_weights": ("SmolLM2 replica peak RSS / weights in memory", "<=", 1.5),
}
# Interleaved mode: issue 12's targets, serve-app / `other` at concurrency `c` in `key`.
# name -> (other, c, key, comparison, threshold); no threshold: informational.
PEER_GOALS: dict[str, tuple[str, int, str, str, float | None]] = {
    "c16_tok_s_vs_llama_server": ("llama-server", 16, "output_tok_s", ">=", 1.25),
    "c16_tok_s_vs_vllm": ("vllm", 16, "output_tok_s", ">=", 1.1),
    "c1_tok_s_vs_llama_server": ("llama-server", 1, "output_tok_s", ">=", 0.75),
    "c1_tok_s_vs_vllm": ("vllm", 1, "output_tok_s", ">=", 2.0),
    "ttft_p50_c16_vs_llama_server": ("llama-server", 16, "ttft_p50_s", "<=", 1.0),
    "served_vs_offline_c16": ("offline-engine", 16, "output_tok_s", ">=", 0.9),
    "c16_tok_s_vs_transformers": ("transformers-serve", 16, "output_tok_s", "", None),
    "c1_tok_s_vs_transformers": ("transformers-serve", 1, "output_tok_s", "", None),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=ALL_TARGETS,
        default=None,
        help=f"default: {' '.join(SWEEP_DEFAULT)}; with --rounds: {' '.join(ROUNDS_DEFAULT)}",
    )
    parser.add_argument(
        "--rounds", type=int, default=0, help="interleaved rounds, all targets up (0: a sweep)"
    )
    parser.add_argument(
        "--smollm2-only",
        action="store_true",
        help="serve-app with SmolLM2 alone (default: make run's config, all three models)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--requests-per-level",
        type=int,
        default=None,
        help="requests per level (at least the concurrency); default max(4, 2 x concurrency)",
    )
    parser.add_argument("--level-timeout-s", type=float, default=120.0, help="cuts a slow level")
    parser.add_argument("--startup-timeout-s", type=float, default=420.0)
    parser.add_argument(
        "--quiet-wait-s",
        type=float,
        default=20.0,
        help="before each level, wait up to this long for other processes to calm down",
    )
    parser.add_argument(
        "--quiet-cores", type=float, default=0.3, help="'calm': others use fewer cores than this"
    )
    parser.add_argument(
        "--noisy-retries",
        type=int,
        default=1,
        help="measure a level again (this many times at most) when others used >= --quiet-cores",
    )
    parser.add_argument(
        "--start-when-quiet-s",
        type=float,
        default=0.0,
        help="first wait up to this long for 30 s in which others use under --quiet-cores",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the naive peer")
    parser.add_argument(
        "--engine-threads",
        type=int,
        default=None,
        help="torch_threads of serve-app's SmolLM2 and the offline engine (default: the config's)",
    )
    parser.add_argument(
        "--engine-option",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="engine options (YAML values) of serve-app's SmolLM2 and the offline engine alike",
    )
    parser.add_argument(
        "--smollm2-replicas",
        type=int,
        default=None,
        help="serve-app's SmolLM2 at this many replicas (default: the config's)",
    )
    parser.add_argument(
        "--replica-env",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="env vars for serve-app's replicas, over REPLICA_ENV_VARS (deployments/app.py)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/serving"))
    args = parser.parse_args()
    if args.targets is None:
        args.targets = list(ROUNDS_DEFAULT if args.rounds else SWEEP_DEFAULT)
    return args


def sweep_levels(args: argparse.Namespace) -> list[tuple[int, int]]:
    if args.requests_per_level:
        return [(c, max(c, args.requests_per_level)) for c in args.concurrency]
    return [(c, max(4, 2 * c)) for c in args.concurrency]


# ---- HTTP targets ----------------------------------------------------------------------


async def http_sweep(
    server: targets.Server,
    levels: list[tuple[int, int]],
    args: argparse.Namespace,
    on_warm: Callable[[], None],
) -> list[dict[str, Any]]:
    max_conn = max(c for c, _ in levels) + 8
    limits = httpx.Limits(max_connections=max_conn, max_keepalive_connections=max_conn)
    timeout = httpx.Timeout(None, connect=10)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=timeout) as client:
        warm = http_sender(client, server.base_url, server.model, 16)
        for concurrency in (1, 4):  # first-request set-up (transformers' CB manager) and batching
            row = await run_level(warm, concurrency, concurrency, args.startup_timeout_s)
            if row["num_ok"] != concurrency:
                raise RuntimeError(f"{server.name} warm-up failed: {row['error_samples']}")
        on_warm()
        send = http_sender(client, server.base_url, server.model, args.max_tokens)
        rows = []
        for concurrency, num_requests in levels:
            quiet = Quiet(
                server.process.pid, args.quiet_cores, args.quiet_wait_s, args.noisy_retries
            )
            row = await run_quietest_level(
                send, concurrency, num_requests, args.level_timeout_s, quiet
            )
            rows.append(row)
            print(format_row(server.name, row), flush=True)
    return rows


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Engine options set on serve-app's SmolLM2 and on the offline engine alike."""
    options = {} if args.engine_threads is None else {"torch_threads": args.engine_threads}
    for name, value in name_values(args.engine_option, "--engine-option").items():
        options[name] = yaml.safe_load(value)
    return options


def name_values(items: list[str], flag: str) -> dict[str, str]:
    pairs = [item.partition("=") for item in items]
    if any(not name or not sep for name, sep, _ in pairs):
        raise SystemExit(f"{flag} takes NAME=VALUE items, got {items}")
    return {name: value for name, _, value in pairs}


def replica_env(args: argparse.Namespace) -> dict[str, str]:
    return name_values(args.replica_env, "--replica-env")


def server_command(
    name: str, args: argparse.Namespace, model_dir: Path, gguf: Path | None = None
) -> tuple[list[str], int, str, dict[str, str]]:
    """(command, port, the `model` it serves, extra env) of an HTTP target."""
    threads = args.threads
    if name == "serve-app":
        command, port = targets.serve_app_command(
            args.out,
            "serve_smollm2" if args.smollm2_only else "serve_all",
            [targets.SMOLLM2_ID] if args.smollm2_only else None,
            engine_overrides(args),
            replica_env(args),
            args.smollm2_replicas,
        )
        return command, port, targets.SMOLLM2_ID, {}
    if name == "transformers-serve":
        command, port = targets.transformers_serve_command(model_dir, threads)
        return command, port, str(model_dir), {}
    if name == "llama-server":
        if gguf is None:
            raise RuntimeError("llama-server needs the model's GGUF source")
        command, port = targets.llama_server_command(gguf, threads)
        return command, port, targets.SMOLLM2_ID, {}
    if name == "vllm":
        command, port = targets.vllm_command(model_dir)
        return command, port, targets.SMOLLM2_ID, targets.VLLM_ENV
    command, port = targets.naive_command(model_dir, threads)
    return command, port, "naive", {}


def run_http_target(
    name: str,
    args: argparse.Namespace,
    model_dir: Path,
    levels: list[tuple[int, int]],
    gguf: Path | None = None,
) -> dict[str, Any]:
    command, port, model, env = server_command(name, args, model_dir, gguf)
    log_path = args.out / f"{name}.log"
    memory: dict[str, Any] = {}
    with targets.running(
        name, command, port, model, log_path, args.startup_timeout_s, env
    ) as server:
        print(f"{name}: healthy after {server.ready_s:.1f}s ({' '.join(command)})", flush=True)

        def on_warm() -> None:
            if name == "serve-app":
                memory["after_warmup"] = replica_memory(server.process.pid)

        rows = asyncio.run(http_sweep(server, levels, args, on_warm))
        if name == "serve-app":
            memory["after_sweep"] = replica_memory(server.process.pid)
    return {"command": command, "startup_s": server.ready_s, "levels": rows, "memory": memory}


def replica_memory(session_id: int) -> dict[str, Any]:
    pids = targets.replica_pids(session_id, REPLICA_PATTERN)
    if len(pids) != 1:
        return {"error": f"expected one {REPLICA_PATTERN} process in our session, found {pids}"}
    return {"pid": pids[0], **targets.memory_of(pids[0])}


def engine_process_memory(server: targets.Server) -> dict[str, Any]:
    """VmRSS etc. of SmolLM2's engine process (the model lives there, not in the replica),
    found by the pid its replica reports at /admin/models/{id}/stats."""
    url = f"{server.base_url}/admin/models/{targets.SMOLLM2_ID}/stats"
    try:
        pid = int(httpx.get(url, timeout=10).json()["engine_pid"])
        return {"pid": pid, **targets.memory_of(pid)}
    except (OSError, httpx.HTTPError, KeyError, ValueError) as exc:
        return {"error": f"engine process memory: {exc}"}


def run_warm_start(args: argparse.Namespace) -> dict[str, Any]:
    """Full config/serve.yaml (all models, weights already converted): spawn to /health 200."""
    command, port = targets.serve_app_command(args.out, "serve_full", None)
    log_path = args.out / "warm-start.log"
    with targets.running(
        "warm-start", command, port, "", log_path, args.startup_timeout_s
    ) as server:
        memory = replica_memory(server.process.pid)
    print(f"warm-start: /health 200 after {server.ready_s:.1f}s", flush=True)
    return {"command": command, "startup_s": server.ready_s, "memory": memory}


# ---- report ------------------------------------------------------------------------------


def level(results: dict[str, Any], target: str, concurrency: int) -> dict[str, Any] | None:
    for row in (results.get(target) or {}).get("levels", []):
        if row["concurrency"] == concurrency:
            return dict(row)
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compute_ratios(results: dict[str, Any], weights_bytes: int) -> dict[str, Any]:
    def metric(target: str, concurrency: int, key: str) -> float | None:
        row = level(results, target, concurrency)
        return row.get(key) if row else None

    ours16, ours1 = metric("serve-app", 16, "output_tok_s"), metric("serve-app", 1, "output_tok_s")
    memories = (results.get("serve-app") or {}).get("memory", {})
    memory, warm = memories.get("after_sweep", {}), memories.get("after_warmup", {})
    values = {
        "c16_tok_s_vs_transformers": ratio(ours16, metric(REFERENCE, 16, "output_tok_s")),
        "c1_tok_s_vs_transformers": ratio(ours1, metric(REFERENCE, 1, "output_tok_s")),
        "ttft_p50_c16_vs_transformers": ratio(
            metric("serve-app", 16, "ttft_p50_s"), metric(REFERENCE, 16, "ttft_p50_s")
        ),
        "http_vs_offline_c16": ratio(ours16, metric("offline-engine", 16, "output_tok_s")),
        "warm_start_s": (results.get("warm-start") or {}).get("startup_s"),
        "rss_vs_weights": ratio(memory.get("VmHWM"), weights_bytes),
        "rss_after_warmup_vs_weights": ratio(warm.get("VmRSS"), weights_bytes),
        "rss_idle_after_sweep_vs_weights": ratio(memory.get("VmRSS"), weights_bytes),
        "c16_tok_s_vs_naive": ratio(ours16, metric("naive", 16, "output_tok_s")),
        "c16_tok_per_cpu_s_vs_transformers": ratio(
            metric("serve-app", 16, "tok_per_server_cpu_s"),
            metric(REFERENCE, 16, "tok_per_server_cpu_s"),
        ),
        "c1_tok_s_vs_naive": ratio(ours1, metric("naive", 1, "output_tok_s")),
    }
    out = {}
    for name, value in values.items():
        what, op, threshold = GOALS.get(name, ("informational", "", None))
        is_met = None
        if value is not None and threshold is not None:
            is_met = value >= threshold if op == ">=" else value <= threshold
        out[name] = {
            "value": value,
            "goal": f"{op} {threshold}" if op else None,
            "met": is_met,
            "what": what,
        }
    return out


def print_report(
    results: dict[str, Any], ratios: dict[str, Any], levels: list[tuple[int, int]]
) -> None:
    header = "| target | c | n | tok/s | TTFT p50/p99 ms | ITL p50/p99 ms | E2E p50/p99 s |"
    print(f"\n{header} tok/CPU-s | errors | cut | others' cores |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for target in (*HTTP_TARGETS, "offline-engine"):
        for concurrency, _ in levels:
            row = level(results, target, concurrency)
            if row:
                print(markdown_row(target, row))
    print("\n| figure | value | goal | met |\n|---|---:|---:|---|")
    for name, entry in ratios.items():
        value = "-" if entry["value"] is None else f"{entry['value']:.2f}"
        met = {True: "met", False: "NOT met", None: "-"}[entry["met"]]
        print(f"| {entry['what']} (`{name}`) | {value} | {entry['goal'] or '-'} | {met} |")


def markdown_row(target: str, row: dict[str, Any]) -> str:
    def pair(key: str, scale: float, fmt: str) -> str:
        values = [row.get(f"{key}_p50_s"), row.get(f"{key}_p99_s")]
        return " / ".join("-" if v is None else format(v * scale, fmt) for v in values)

    return (
        f"| {target} | {row['concurrency']} | {row['num_requests']} | {row['output_tok_s']:.1f} | "
        f"{pair('ttft', 1000, '.0f')} | {pair('itl', 1000, '.0f')} | {pair('e2e', 1, '.1f')} | "
        f"{_fmt(row.get('tok_per_server_cpu_s'), '.1f')} | {row['num_errors']} | "
        f"{row['num_timed_out']} | {row['cores_others']:.2f} |"
    )


PANELS = [  # key, p99 key or None, title, scale
    ("output_tok_s", None, "aggregate output tokens/s", 1.0),
    ("ttft_p50_s", "ttft_p99_s", "TTFT (ms; p50 solid, p99 dashed)", 1000.0),
    ("itl_p50_s", "itl_p99_s", "inter-token latency (ms; p50 / p99)", 1000.0),
    ("tok_per_server_cpu_s", None, "output tokens per CPU-second of the server", 1.0),
    ("e2e_p50_s", "e2e_p99_s", "end-to-end latency (s; p50 / p99)", 1.0),
    ("cores_others", None, "noise: cores used by other processes", 1.0),
]


def plot(results: dict[str, Any], concurrency: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for ax, (key, key99, title, scale) in zip(axes.T.flat, PANELS, strict=True):
        for index, target in enumerate((*HTTP_TARGETS, "offline-engine")):
            rows = (results.get(target) or {}).get("levels", [])
            xs = [r["concurrency"] for r in rows]
            color = f"C{index}"
            ax.plot(xs, [_scaled(r.get(key), scale) for r in rows], "o-", color=color, label=target)
            if key99:
                ax.plot(xs, [_scaled(r.get(key99), scale) for r in rows], "x--", color=color)
            cut = [r for r in rows if r["num_timed_out"]]
            ax.scatter(
                [r["concurrency"] for r in cut],
                [_scaled(r.get(key), scale) for r in cut],
                s=160,
                facecolors="none",
                edgecolors="red",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrency, [str(x) for x in concurrency])
        if key99:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_title(title)
        ax.set_xlabel("concurrent requests")
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle(
        "SmolLM2-135M-Instruct, CPU float32, greedy, streamed chat completions "
        "(red ring: level cut at its time limit; latencies of finished requests only)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _scaled(value: float | None, scale: float) -> float:
    return float("nan") if value is None else value * scale


def run_target(
    name: str,
    args: argparse.Namespace,
    model_config: ModelConfig,
    cache_dir: Path,
    levels: list[tuple[int, int]],
) -> dict[str, Any]:
    if name in HTTP_TARGETS:
        model_dir = prepare_weights(model_config, cache_dir, native=False)  # peers read float32
        return run_http_target(name, args, model_dir, levels, gguf_of(model_config, cache_dir))
    if name == "offline-engine":
        from peers.offline import run_offline

        quiet = Quiet(None, args.quiet_cores, args.quiet_wait_s, args.noisy_retries)
        return run_offline(
            model_config, cache_dir, levels, args.max_tokens, args.level_timeout_s, quiet
        )
    return run_warm_start(args)


def gguf_of(model_config: ModelConfig, cache_dir: Path) -> Path | None:
    """The model's GGUF file (llama-server serves it as is), None for another source."""
    weights = resolve_source(model_config, cache_dir)
    return weights.directory / weights.gguf_file if weights.gguf_file else None


# ---- interleaved rounds (--rounds) -------------------------------------------------------


def run_rounds(
    args: argparse.Namespace,
    model_config: ModelConfig,
    cache_dir: Path,
    levels: list[tuple[int, int]],
) -> dict[str, Any]:
    """Every HTTP target up at once (and the offline engine here), then interleaved rounds."""
    # vLLM and transformers serve read the float32 folder; llama-server the GGUF itself.
    model_dir = prepare_weights(model_config, cache_dir, native=False)
    gguf = gguf_of(model_config, cache_dir)
    servers: dict[str, targets.Server] = {}
    memory: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        for name in (n for n in args.targets if n in HTTP_TARGETS):
            command, port, model, env = server_command(name, args, model_dir, gguf)
            log_path = args.out / f"{name}.log"
            servers[name] = stack.enter_context(
                targets.running(name, command, port, model, log_path, args.startup_timeout_s, env)
            )
            print(f"{name}: healthy after {servers[name].ready_s:.1f}s ({' '.join(command)})")
        engine = None
        if "offline-engine" in args.targets:
            from serve_app.loading import build_llm_engine

            engine = build_llm_engine(model_config, cache_dir)
            stack.callback(engine.shutdown)
        rows = asyncio.run(_rounds(args, servers, engine, levels))
        if "serve-app" in servers:
            memory = replica_memory(servers["serve-app"].process.pid)
            memory["engine_process"] = engine_process_memory(servers["serve-app"])
    return {
        "rows": rows,
        "servers": {n: {"startup_s": v.ready_s} for n, v in servers.items()},
        "serve_app_replica_memory": memory,
    }


async def _rounds(
    args: argparse.Namespace,
    servers: dict[str, targets.Server],
    engine: Any,
    levels: list[tuple[int, int]],
) -> list[dict[str, Any]]:
    from peers.offline import engine_maker

    max_conn = max(c for c, _ in levels) + 8
    limits = httpx.Limits(max_connections=max_conn, max_keepalive_connections=max_conn)
    async with httpx.AsyncClient(
        trust_env=False, limits=limits, timeout=httpx.Timeout(None, connect=10)
    ) as client:
        senders: dict[str, MakeSender] = {}
        sessions: dict[str, Quiet] = {}
        for name in args.targets:
            if name in servers:
                server = servers[name]
                senders[name] = http_maker(client, server)
                sessions[name] = Quiet(session_id=server.process.pid)  # its own session
            elif name == "offline-engine" and engine is not None:
                senders[name] = engine_maker(engine)
                sessions[name] = Quiet(session_id=None)  # the engine runs in this process
        return await interleaved_rounds(
            senders, sessions, args.rounds, levels, args.max_tokens, args.level_timeout_s
        )


def peer_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for name, (other, concurrency, key, op, threshold) in PEER_GOALS.items():
        value = median_ratio(rows, "serve-app", other, concurrency, key)
        is_met = None
        if value is not None and threshold is not None:
            is_met = value >= threshold if op == ">=" else value <= threshold
        what = f"{key} at c={concurrency}, serve-app / {other}"
        goal = f"{op} {threshold}" if threshold is not None else None
        out[name] = {"value": value, "goal": goal, "met": is_met, "what": what}
    return out


def print_rounds_report(rows: list[dict[str, Any]], ratios: dict[str, Any]) -> None:
    print("\n| round | target | c | tok/s | TTFT p50 ms | ITL p50 ms | errors | cut | others |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['round']} | {row['target']} | {row['concurrency']} | "
            f"{row['output_tok_s']:.1f} | {_fmt(_scaled(row['ttft_p50_s'], 1000), '.0f')} | "
            f"{_fmt(_scaled(row['itl_p50_s'], 1000), '.0f')} | {row['num_errors']} | "
            f"{row['num_timed_out']} | {row['cores_others']:.2f} |"
        )
    print("\n| figure (median of same-round ratios) | value | goal | met |\n|---|---:|---:|---|")
    for name, entry in ratios.items():
        value = "-" if entry["value"] is None else f"{entry['value']:.2f}"
        met = {True: "met", False: "NOT met", None: "-"}[entry["met"]]
        print(f"| {entry['what']} (`{name}`) | {value} | {entry['goal'] or '-'} | {met} |")


def wait_for_quiet_window(max_cores: float, max_wait_s: float, window_s: float = 30.0) -> float:
    """Waits until other processes used under max_cores for window_s in a row (or max_wait_s)."""
    started = time.monotonic()
    quiet_since = time.monotonic()
    while time.monotonic() - started < max_wait_s:
        before = noise.snapshot(None)
        time.sleep(5)
        if noise.cores_used(before, noise.snapshot(None))["cores_others"] >= max_cores:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= window_s:
            break
    return time.monotonic() - started


def machine_info() -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "?"
    )
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    git = ["git", "-C", str(targets.REPO_ROOT)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "serve_app", "deployments", "config"],
        capture_output=True,
        text=True,
    ).stdout
    return {
        "git_commit": commit.strip(),
        "uncommitted_service_files": dirty.splitlines()[:20],
        "nproc": os.cpu_count(),
        "cpu": model,
        "mem_gib": round(mem_kb / 2**20, 1),
        "platform": platform.platform(),
        "versions": {
            p: metadata.version(p)
            for p in ("torch", "transformers", "ray", "fastapi", "uvicorn", "httpx")
        },
    }


def main() -> None:
    args = parse_args()
    # SIGTERM unwinds like Ctrl-C, so the server under test (own session) is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("SERVE_APP_API_KEYS", None)
    config = app_config_from_serve_config(targets.REPO_ROOT / "config" / "serve.yaml")
    model_config = config.model(targets.SMOLLM2_ID)
    if model_config is None:
        raise SystemExit(f"config/serve.yaml has no {targets.SMOLLM2_ID}")
    engine = model_config.engine.model_copy(update=engine_overrides(args))
    model_config = model_config.model_copy(update={"engine": engine})
    # converted once, cached (the peers' float32 folder)
    model_dir = prepare_weights(model_config, Path(config.cache_dir), native=False)
    levels = sweep_levels(args)
    if args.start_when_quiet_s > 0:
        waited = wait_for_quiet_window(args.quiet_cores, args.start_when_quiet_s)
        print(f"started after waiting {waited:.0f}s for a quiet machine", flush=True)
    machine = machine_info()  # with the commit under test, taken before the run
    if args.rounds:
        main_rounds(args, machine, model_config, Path(config.cache_dir), model_dir, levels)
        return
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for name in args.targets:
        target_started = time.perf_counter()
        try:
            results[name] = run_target(name, args, model_config, Path(config.cache_dir), levels)
        except Exception as exc:  # noqa: BLE001 -- one broken target must not lose the others
            print(f"{name}: FAILED: {exc}", flush=True)
            results[name] = {"error": str(exc), "levels": []}
        results[name]["wall_s"] = time.perf_counter() - target_started
        time.sleep(3)  # let the stopped server's processes go before the next target
    weights_bytes = targets.safetensors_bytes(model_dir)
    ratios = compute_ratios(results, weights_bytes)
    print_report(results, ratios, levels)
    report = {
        "machine": machine,
        "settings": {
            "model_dir": str(model_dir),
            "max_tokens": args.max_tokens,
            "levels": levels,
            "level_timeout_s": args.level_timeout_s,
            "quiet_wait_s": args.quiet_wait_s,
            "quiet_cores": args.quiet_cores,
            "noisy_retries": args.noisy_retries,
            "engine_overrides": engine_overrides(args),
            "weights_bytes": weights_bytes,
            "total_s": time.perf_counter() - started,
        },
        "targets": results,
        "ratios": ratios,
    }
    (args.out / "serving.json").write_text(json.dumps(report, indent=2, default=str))
    plot(results, args.concurrency, args.out / "serving.png")
    total_s = report["settings"]["total_s"]
    print(f"\nwrote serving.json and serving.png to {args.out} in {total_s:.0f}s")


def main_rounds(
    args: argparse.Namespace,
    machine: dict[str, Any],
    model_config: ModelConfig,
    cache_dir: Path,
    model_dir: Path,
    levels: list[tuple[int, int]],
) -> None:
    started = time.perf_counter()
    results = run_rounds(args, model_config, cache_dir, levels)
    ratios = peer_ratios(results["rows"])
    print_rounds_report(results["rows"], ratios)
    memory = results["serve_app_replica_memory"]
    if "VmRSS" in memory:
        engine = memory.get("engine_process", {})
        engine_text = f"{engine['VmRSS'] / 2**20:.0f} MB" if "VmRSS" in engine else "not found"
        pss = [f"{part.get('Pss', 0) / 2**20:.0f}" for part in (memory, engine)]
        print(
            f"\nSmolLM2 after the rounds: replica process RSS {memory['VmRSS'] / 2**20:.0f} MB, "
            f"its engine process (the model) {engine_text}; PSS (shared pages counted as "
            f"their share) {pss[0]} + {pss[1]} MB"
        )
    if "warm-start" in args.targets:
        results["warm-start"] = run_warm_start(args)
    report = {
        "machine": machine,
        "settings": {
            "model_dir": str(model_dir),
            "targets": args.targets,
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "levels": levels,
            "level_timeout_s": args.level_timeout_s,
            "engine_overrides": engine_overrides(args),
            "smollm2_only": args.smollm2_only,
            "smollm2_replicas": args.smollm2_replicas,
            "total_s": time.perf_counter() - started,
        },
        **results,
        "median_ratios": ratios,
    }
    (args.out / "serving_rounds.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote serving_rounds.json to {args.out} in {report['settings']['total_s']:.0f}s")


if __name__ == "__main__":
    main()
