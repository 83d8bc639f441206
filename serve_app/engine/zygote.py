"""A warm starter of engine processes: torch, transformers and the engine imported once, then one
fork per engine process, so a replica's engine starts without paying those imports again.

Measured on this 2-core VM: a fresh `python -m serve_app.engine.engine_process` spends ~3.5 s
importing (torch, transformers and the modules transformers loads lazily on first use) before
it reads a weight; a fork of this process starts on the weights at once (docs/operations.md).

Started as `python -m serve_app.engine.zygote SOCKET_PATH OWNER_PID` (deployments/engine_zygote.py
keeps one per node). It listens on a Unix socket; each connection is one engine process:
  in:  a JSON line {"replica_pid": int, "env": {...}}, with three file descriptors passed
       alongside (SCM_RIGHTS): the replica's end of its engine socket pair, and the replica's
       stdout and stderr (the engine logs where a spawned one would)
  out: {"pid": child pid}, then {"exit": exit status} when the child ends, then EOF.
The child takes the replica's environment and runs engine_process.main as a spawned one would,
watching the replica (not this process) to die with it. Only the CPU path: a GPU replica's
engine needs its own CUDA_VISIBLE_DEVICES before torch starts, so it is spawned as before.

No thread and no torch operation runs here before a fork (a forked child gets only the forking
thread, so another thread's locks, or OpenMP's pool, would be broken in it).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

# What a fresh engine process would import on its way to its first weight. The model's own
# modeling file (transformers.models.<type>) still loads in the child: a few tenths of a second.
PRELOAD = (
    "serve_app.engine.engine_process",
    "serve_app.loading",
    "serve_app.engine.grammar",
    "transformers.modeling_utils",
    "transformers.generation.utils",
    "transformers.masking_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
)
_REAP_INTERVAL_S = 0.2
_MAX_MESSAGE = 1 << 20


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)


def serve(socket_path: str, owner_pid: int) -> None:
    """Forks engine processes for the replicas that connect, until the owner dies."""
    from serve_app.engine.engine_process import die_with_parent

    die_with_parent(owner_pid)  # the keeper actor; its death ends this process, not the engines
    gc.disable()  # no collection here: the imports' objects stay where they are (see _fork)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
    listener.bind(socket_path + ".tmp")
    listener.listen(16)
    preload()
    os.rename(socket_path + ".tmp", socket_path)  # found only once warm
    children: dict[int, socket.socket] = {}  # engine pid -> its replica's connection
    while True:
        readable, _, _ = select.select([listener], [], [], _REAP_INTERVAL_S)
        if readable:
            connection, _ = listener.accept()
            pid = _start_engine(connection, listener, children)
            if pid is not None:
                children[pid] = connection
        _reap(children)


def _start_engine(
    connection: socket.socket, listener: socket.socket, children: dict[int, socket.socket]
) -> int | None:
    fds: list[int] = []
    try:
        connection.settimeout(10.0)
        message, fds, _, _ = socket.recv_fds(connection, _MAX_MESSAGE, 3)
        request = json.loads(message)
        if len(fds) != 3:
            raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
    except (OSError, ValueError) as exc:
        for fd in fds:  # a refused request's descriptors stay not open here
            os.close(fd)
        _send(connection, {"error": str(exc)})
        connection.close()
        return None
    pid = _fork()
    if pid == 0:  # the engine process
        _run_child(fds, request, [listener, connection, *children.values()])
    for fd in fds:
        os.close(fd)
    _send(connection, {"pid": pid})
    return pid


def _fork() -> int:
    """os.fork with every object so far out of the child's garbage collections (gc.freeze, as
    CPython's docs advise before a fork): a collection writes into each object it visits, so it
    would copy every page of the preloaded modules into the child. Measured with make run's
    config after serving.py's load (benchmarks/service_memory.py, three paired runs): Gemma's
    engine 66-84 MB fewer pages of its own, SmolLM2's 0-97 MB (when a full collection ran in
    it), the service's summed PSS 59-154 MB lower (docs/benchmarks.md, session 29)."""
    gc.freeze()
    pid = os.fork()
    if pid == 0:
        gc.enable()
    return pid


def _run_child(fds: list[int], request: dict[str, Any], inherited: list[socket.socket]) -> None:
    """Never returns: the engine's main loop, then exit without the zygote's cleanup."""
    status = 1
    engine_fd, stdout_fd, stderr_fd = fds
    try:
        for sock in inherited:
            sock.close()
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        os.close(stdout_fd)
        os.close(stderr_fd)
        os.environ.clear()
        os.environ.update(request["env"])
        from serve_app.engine.engine_process import main

        main(engine_fd, int(request["replica_pid"]), forked=True)
        status = 0
    except BaseException:  # noqa: BLE001  # reported on stderr; the replica sees the exit
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


def _reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = children.pop(pid, None)
        if connection is not None:
            _send(connection, {"exit": os.waitstatus_to_exitcode(status)})
            connection.close()


def _send(connection: socket.socket, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the replica is gone: nobody to tell
        connection.sendall(json.dumps(message).encode() + b"\n")


# ---- the replica's side ------------------------------------------------------------------


class ForkedProcess:
    """An engine process the zygote forked, with what EngineClient uses of subprocess.Popen:
    pid, poll, wait, kill. Not this process's child: a pidfd tells its end (and signals it
    without hitting a reused pid); the zygote's connection tells its exit status."""

    def __init__(self, pid: int, connection: socket.socket, reader: Any) -> None:
        self.pid = pid
        self._connection = connection
        self._reader = reader  # the connection's one buffered reader: {"exit"} may be read ahead
        self._pidfd = os.pidfd_open(pid)
        self._lock = threading.Lock()  # polled from the engine-io thread and health checks
        self.returncode: int | None = None

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None and _is_readable(self._pidfd, 0):
                self.returncode = self._exit_status()
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None and not _is_readable(self._pidfd, timeout):
            raise subprocess.TimeoutExpired(f"engine process {self.pid}", timeout or 0)
        code = self.poll()
        assert code is not None
        return code

    def kill(self) -> None:
        with self._lock:
            if self.returncode is None:  # else the pidfd is closed
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def _exit_status(self) -> int:
        """The zygote sends it once it reaped the child (within its reap interval)."""
        self._connection.settimeout(2 * _REAP_INTERVAL_S + 1.0)
        try:
            message = json.loads(self._reader.readline() or b"{}")
        except (OSError, ValueError):
            message = {}
        self._connection.close()
        os.close(self._pidfd)
        return int(message.get("exit", -1))  # -1: ended, status unknown (the zygote died)


def can_fork_engines() -> bool:
    """Linux with pidfds (5.3+): what ForkedProcess needs."""
    return hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


def fork_engine(socket_path: str, engine_fd: int) -> ForkedProcess:
    """An engine process forked by the zygote at `socket_path`, on this replica's socket end
    `engine_fd`, with this process's environment. Raises OSError if the zygote cannot."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.settimeout(10.0)
        connection.connect(socket_path)
        request = json.dumps({"replica_pid": os.getpid(), "env": dict(os.environ)}).encode()
        socket.send_fds(connection, [request], [engine_fd, 1, 2])
        reader = connection.makefile("rb")
        reply = json.loads(reader.readline() or b"{}")
    except (OSError, ValueError) as exc:
        connection.close()
        raise OSError(f"the engine zygote at {socket_path} failed: {exc}") from exc
    if "pid" not in reply:
        connection.close()
        raise OSError(f"the engine zygote at {socket_path} refused: {reply.get('error')}")
    return ForkedProcess(int(reply["pid"]), connection, reader)


def _is_readable(fd: int, timeout: float | None) -> bool:
    readable, _, _ = select.select([fd], [], [], timeout)
    return bool(readable)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
