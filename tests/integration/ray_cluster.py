"""A private Ray cluster for tests that need `serve deploy` against a running cluster.

The approach of scripts/multinode_demo.sh, in Python: `ray start --head --block` in a session of
its own (so everything it spawns is ours alone), its own temp dir, free ports, the dashboard on
127.0.0.1 and a random auth token that lives only in this process's environment. Stopping sends
SIGTERM to that `ray start`, then kills whatever is left in its session, by pid. Never `ray stop`:
it would stop every Ray instance on the machine, other people's included.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_app.ports import free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent
# Ray turns 127.0.0.1 as a node address into this machine's routable IP; another loopback
# address keeps the node's own listeners on the loopback interface.
NODE_IP = "127.0.0.2"
_DRAIN_TIMEOUT_S = 5


def session_members(session_id: int) -> list[int]:
    """Live (non-zombie) processes in a session: a node's `ray start` and all it spawned."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        state, session = fields[0], int(fields[3])
        if session == session_id and state != "Z":
            members.append(int(stat.parent.name))
    return members


@dataclass
class PrivateCluster:
    """One head node of our own; `deploy` a Serve config to it, query its Serve REST API."""

    state_dir: Path
    num_cpus: float = 2
    env: dict[str, str] = field(default_factory=dict)
    dashboard_url: str = ""
    http_port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.state_dir / "head.log"

    def start(self, timeout_s: float = 120) -> None:
        gcs, dashboard, agent, client, self.http_port = free_ports(5)
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self.env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(_DRAIN_TIMEOUT_S),
        }
        self.env.pop("RAY_ADDRESS", None)
        command = [
            str(BIN_DIR / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            f"--node-ip-address={NODE_IP}", f"--port={gcs}", f"--num-cpus={self.num_cpus}",
            f"--temp-dir={self.state_dir / 'ray'}", "--min-worker-port=0", "--max-worker-port=0",
            f"--object-store-memory={256 * 1024 * 1024}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command,
                env=self.env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait(self._dashboard_answers, timeout_s, "the dashboard to answer")

    def deploy(self, config: dict[str, Any], name: str, timeout_s: float = 120) -> None:
        """`serve deploy` of a config (returns once the cluster accepted it)."""
        config = {**config, "http_options": {"host": "127.0.0.1", "port": self.http_port}}
        path = self.state_dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        result = subprocess.run(
            [str(BIN_DIR / "serve"), "deploy", str(path), "--address", self.dashboard_url],
            env=self.env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        assert result.returncode == 0, f"serve deploy {name}:\n{result.stdout}\n{result.stderr}"

    def applications(self) -> dict[str, Any]:
        """Serve's applications as its REST API reports them (what `serve status` shows)."""
        response = httpx.get(
            f"{self.dashboard_url}/api/serve/applications/", headers=self.auth, timeout=30
        )
        response.raise_for_status()
        apps: dict[str, Any] = response.json().get("applications") or {}
        return apps

    def wait_settled(self, config: dict[str, Any], timeout_s: float = 300) -> None:
        """Until Serve runs exactly `config`'s applications, each replica RUNNING."""
        self._wait(lambda: is_settled(self.applications(), config), timeout_s, "a settled app")

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}

    def stop(self) -> list[int]:
        """Stops what `start` started; returns the pids that had to be killed after SIGTERM."""
        if self.process is None:
            return []
        with contextlib.suppress(Exception):
            subprocess.run(
                [str(BIN_DIR / "serve"), "shutdown", "--yes", "--address", self.dashboard_url],
                env=self.env,
                capture_output=True,
                timeout=30,
            )
        session = self.process.pid
        self.process.send_signal(signal.SIGTERM)  # `ray start --block` drains, then stops its own
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=_DRAIN_TIMEOUT_S * 2 + 30)
        deadline = time.monotonic() + 15  # the dashboard's children exit a moment later
        while (left := session_members(session)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:  # only processes of the session this cluster started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self.process = None
        return left

    def _dashboard_answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"ray start exited ({self.process.returncode}):\n{tail}")
        try:
            response = httpx.get(f"{self.dashboard_url}/api/version", headers=self.auth, timeout=5)
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def _wait(check: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def is_settled(apps: dict[str, Any], config: dict[str, Any]) -> bool:
    """Serve (its REST API's `apps`) runs exactly `config`'s applications, all replicas RUNNING."""
    for name, app in apps.items():
        if app["status"] in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise AssertionError(f"{name}: {app['status']}: {app.get('message')}")
    deployed = {
        name: (app.get("deployed_app_config") or {}).get("args") for name, app in apps.items()
    }
    if deployed != {app["name"]: app.get("args") for app in config["applications"]}:
        return False
    states = {
        replica["state"]
        for app in apps.values()
        for deployment in app["deployments"].values()
        for replica in deployment["replicas"]
    }
    return {app["status"] for app in apps.values()} == {"RUNNING"} and states == {"RUNNING"}


@contextlib.contextmanager
def private_cluster(num_cpus: float = 2) -> Iterator[PrivateCluster]:
    """A started PrivateCluster; stopped (and its temp dir removed on success) afterwards."""
    # A short folder: Ray's unix socket paths under it must stay under 108 characters.
    state_dir = Path(tempfile.mkdtemp(prefix="serve-app-rc-", dir="/tmp"))
    cluster = PrivateCluster(state_dir, num_cpus=num_cpus)
    is_ok = False
    try:
        cluster.start()
        yield cluster
        is_ok = True
    finally:
        left = cluster.stop()
        if is_ok and not left:
            shutil.rmtree(state_dir, ignore_errors=True)
        else:
            print(f"private cluster state kept in {state_dir}; killed after SIGTERM: {left}")


def deployment_status(admin_status: dict[str, Any], deployment: str) -> dict[str, Any]:
    """One deployment's entry in GET /admin/status, whichever application holds it."""
    for app in admin_status["applications"].values():
        if deployment in app["deployments"]:
            found: dict[str, Any] = app["deployments"][deployment]
            return found
    raise KeyError(f"no deployment {deployment!r} in {admin_status}")
