"""Shared fixtures: the real service (serve run of config/serve.yaml on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serve_app.ports import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = REPO_ROOT / "config" / "serve.yaml"
OUTPUT_DIR = REPO_ROOT / "test-output"
STARTUP_TIMEOUT_S = 420


def _wait_ready(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve run exited early; see {log_path}:\n{_tail(log_path)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"service not healthy after {STARTUP_TIMEOUT_S}s; see {log_path}")


def _tail(path: Path, num_lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])


def _stop(process: subprocess.Popen[bytes]) -> None:
    # serve run shuts Serve and its local Ray cluster down on SIGINT.
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def write_test_config(port: int, path: Path, config: dict[str, Any] | None = None) -> Path:
    config = config or yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.contextmanager
def running_service(
    workdir: Path, name: str, config: dict[str, Any] | None = None, ready_path: str = "/health"
) -> Iterator[str]:
    """`serve run` of a config on a free 127.0.0.1 port; yields its URL; stops it after."""
    port = free_port()
    config_path = write_test_config(port, workdir / f"{name}.yaml", config)
    OUTPUT_DIR.mkdir(exist_ok=True)
    log_path = OUTPUT_DIR / f"{name}.log"
    launcher = Path(sys.executable).parent / "serve-app"  # serve run, HAProxy in front
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(launcher), "run", "--config", str(config_path)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(f"{url}{ready_path}", process, log_path)
        yield url
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def service_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of the real service with the bundled models (or SERVE_APP_URL if set)."""
    if os.environ.get("SERVE_APP_URL"):
        yield os.environ["SERVE_APP_URL"].rstrip("/")
        return
    with running_service(tmp_path_factory.mktemp("serve"), "serve") as url:
        yield url
