"""One engine zygote per node (serve_app/engine/zygote.py), kept by a detached Ray actor: LLM
replicas on that node fork their engine processes from it instead of starting a fresh Python,
so a replica woken from zero (or replaced) skips ~3.5 s of imports. The actor outlives the
replicas (that is the point) and ends with the Ray cluster; the zygote dies with the actor.

SERVE_APP_ENGINE_ZYGOTE=0 in a replica's environment turns it off (engines spawned as before).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serve_app.engine.zygote import can_fork_engines

logger = logging.getLogger(__name__)

ZYGOTE_ENV = "SERVE_APP_ENGINE_ZYGOTE"
NAMESPACE = "serve-app"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])
_WARM_TIMEOUT_S = 120.0


@ray.remote(num_cpus=0)
class EngineZygote:
    """Starts the zygote process and says where it listens once it has imported everything."""

    def __init__(self) -> None:
        self.socket_path = os.path.join(tempfile.gettempdir(), f"serve-app-zygote-{os.getpid()}")
        self.process = self._start()

    def socket_path_when_warm(self) -> str | None:
        """The socket's path once the zygote has imported everything (it puts the socket there
        then); a zygote that died is started again. None if it does not come up."""
        if self.process.poll() is not None:
            logger.warning("the engine zygote exited (%s); starting it again", self.process.poll())
            self.process = self._start()
        deadline = time.monotonic() + _WARM_TIMEOUT_S
        while time.monotonic() < deadline and self.process.poll() is None:
            if os.path.exists(self.socket_path):
                return self.socket_path
            time.sleep(0.05)
        return None

    def _start(self) -> subprocess.Popen[bytes]:
        with contextlib.suppress(FileNotFoundError):  # a dead zygote's
            os.unlink(self.socket_path)
        path = os.environ.get("PYTHONPATH", "")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, path]))}
        command = [sys.executable, "-m", "serve_app.engine.zygote", self.socket_path]
        return subprocess.Popen([*command, str(os.getpid())], env=env)


def _code_version() -> str:
    """Which code a zygote holds: a Ray working_dir of another version lands in another folder,
    and a zygote forks the code it imported, so each (interpreter, code folder) has its own."""
    return hashlib.sha256(f"{sys.executable}\0{_PACKAGE_ROOT}".encode()).hexdigest()[:12]


def zygote_socket() -> str | None:
    """This node's zygote socket (its keeper created if none runs yet), or None when off,
    outside Ray, or not available here."""
    if os.environ.get(ZYGOTE_ENV, "1") == "0" or not ray.is_initialized() or not can_fork_engines():
        return None
    node_id = ray.get_runtime_context().get_node_id()
    try:
        keeper = EngineZygote.options(  # type: ignore[attr-defined]
            name=f"engine-zygote-{_code_version()}-{node_id}",
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote()
        path: str | None = ray.get(keeper.socket_path_when_warm.remote(), timeout=_WARM_TIMEOUT_S)
    except Exception:  # noqa: BLE001  # the replica still starts, spawning its engine itself
        logger.exception("no engine zygote on this node")
        return None
    if path is None:
        logger.warning("the engine zygote on this node is not running")
    return path
