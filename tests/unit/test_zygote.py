"""Engine processes forked by the zygote (serve_app/engine/zygote.py) on the tiny Llama: the same
outputs as a spawned engine process, the zygote's child (not a fresh Python), a killed engine
failing its requests with its exit status, no engine left when its replica is SIGKILLed, the
zygote gone with its owner, and a fresh process when the zygote cannot fork."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve_app.engine.engine_client import EngineClient
from serve_app.engine.types import SamplingParams
from serve_app.engine.zygote import can_fork_engines, fork_engine
from tests.processes import is_running, wait_until_gone
from tests.unit.conftest import tiny_model_config
from tests.unit.test_engine_process import PROMPTS, collect, joined

pytestmark = pytest.mark.skipif(not can_fork_engines(), reason="needs Linux pidfds")
ROOT = str(Path(__file__).resolve().parents[2])


def start_zygote(socket_path: Path, owner_pid: int) -> subprocess.Popen[bytes]:
    zygote = subprocess.Popen(
        [sys.executable, "-m", "serve_app.engine.zygote", str(socket_path), str(owner_pid)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    deadline = time.monotonic() + 60
    while not socket_path.exists():
        assert zygote.poll() is None and time.monotonic() < deadline, "the zygote did not warm"
        time.sleep(0.05)
    return zygote


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    socket_path = tmp_path_factory.mktemp("zygote") / "zygote.sock"
    process = start_zygote(socket_path, os.getpid())
    yield str(socket_path), process.pid
    process.kill()  # the zygote this test started
    process.wait(10)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


async def test_a_forked_engine_answers_as_a_spawned_one(
    zygote: tuple[str, int], tiny_model_dir: Path, tmp_path: Path
) -> None:
    socket_path, zygote_pid = zygote
    config = tiny_model_config(tiny_model_dir, max_num_seqs=8)
    forked = EngineClient(config, tmp_path, has_gpu=False, zygote_socket=socket_path)
    spawned = EngineClient(config, tmp_path, has_gpu=False)
    try:
        assert forked.pid is not None and parent_of(forked.pid) == zygote_pid
        assert spawned.pid is not None and parent_of(spawned.pid) == os.getpid()
        for index, prompt in enumerate(PROMPTS):
            ours = await collect(forked, f"f{index}", prompt, temperature=0.0, max_tokens=12)
            theirs = await collect(spawned, f"s{index}", prompt, temperature=0.0, max_tokens=12)
            assert joined(ours) == joined(theirs) and ours[-1].finish_reason == "length"
    finally:
        forked.shutdown()
        spawned.shutdown()
    assert forked.pid is not None and wait_until_gone(forked.pid)


async def test_a_killed_forked_engine_fails_its_requests_with_its_exit_status(
    zygote: tuple[str, int], tiny_model_dir: Path, tmp_path: Path
) -> None:
    client = EngineClient(tiny_model_config(tiny_model_dir), tmp_path, False, zygote[0])
    try:
        endless = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
        stream = client.generate("r", [1, 2, 3], endless)
        await stream.__anext__()
        assert client.pid is not None
        os.kill(client.pid, signal.SIGKILL)  # the engine process this test started
        rest = [output async for output in stream]
        assert rest[-1].finish_reason == "error"
        assert "exit code -9" in (rest[-1].error or "")
        assert not client.is_alive
    finally:
        client.shutdown()


def test_a_bad_request_is_refused_and_the_zygote_keeps_forking(
    zygote: tuple[str, int], tiny_model_dir: Path, tmp_path: Path
) -> None:
    read_end, write_end = os.pipe()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(zygote[0])
        socket.send_fds(connection, [b"not json"], [read_end])
        reply = json.loads(connection.makefile("rb").readline())
    finally:
        connection.close()
        os.close(read_end)
        os.close(write_end)
    assert "error" in reply
    client = EngineClient(tiny_model_config(tiny_model_dir), tmp_path, False, zygote[0])
    try:
        assert client.pid is not None and parent_of(client.pid) == zygote[1]
    finally:
        client.shutdown()


_REPLICA = r"""
import sys
from pathlib import Path
from serve_app.engine.engine_client import EngineClient
from tests.unit.conftest import tiny_model_config
client = EngineClient(tiny_model_config(Path(sys.argv[1])), Path(sys.argv[2]), False, sys.argv[3])
print(client.pid, flush=True)
sys.stdin.read()  # until killed
"""


def test_sigkill_of_the_replica_ends_its_forked_engine(
    zygote: tuple[str, int], tiny_model_dir: Path, tmp_path: Path
) -> None:
    replica = subprocess.Popen(
        [sys.executable, "-c", _REPLICA, str(tiny_model_dir), str(tmp_path), zygote[0]],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    try:
        assert replica.stdout is not None
        engine_pid = int(replica.stdout.readline())
        assert parent_of(engine_pid) == zygote[1]  # not the replica's child: no death signal
        replica.kill()  # SIGKILL: no cleanup code of the replica runs
        replica.wait(10)
        assert wait_until_gone(engine_pid), "the forked engine outlived its replica"
    finally:
        if replica.poll() is None:
            replica.kill()


_OWNER = r"""
import os, subprocess, sys
command = [sys.executable, "-m", "serve_app.engine.zygote", sys.argv[1], str(os.getpid())]
zygote = subprocess.Popen(command)
print(zygote.pid, flush=True)
sys.stdin.read()  # until killed
"""


def test_the_zygote_ends_with_its_owner(tmp_path: Path) -> None:
    socket_path = tmp_path / "owned.sock"
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(socket_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    try:
        assert owner.stdout is not None
        zygote_pid = int(owner.stdout.readline())
        deadline = time.monotonic() + 60
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert socket_path.exists() and is_running(zygote_pid)
        owner.kill()  # the owner this test started (the keeper actor, in the service)
        owner.wait(10)
        assert wait_until_gone(zygote_pid), "the zygote outlived its owner"
    finally:
        if owner.poll() is None:
            owner.kill()


def test_no_zygote_raises_and_the_client_spawns_instead(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(OSError, match="zygote"):
            fork_engine(str(tmp_path / "absent.sock"), read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    client = EngineClient(
        tiny_model_config(tiny_model_dir), tmp_path, False, str(tmp_path / "absent.sock")
    )
    try:
        assert client.pid is not None and parent_of(client.pid) == os.getpid()
    finally:
        client.shutdown()


_FORK_PROBE = r"""
import gc, json, os
from serve_app.engine import zygote
gc.disable()  # as zygote.serve runs
before_fork = [object()]  # a container the collector tracks
pid = zygote._fork()
if pid == 0:
    tracked = any(o is before_fork for o in gc.get_objects())
    print(json.dumps({"gc_enabled": gc.isenabled(), "visits_preforked": tracked}), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_a_forked_child_collects_garbage_but_never_visits_the_zygotes_objects() -> None:
    """A collection in the child writes into every object it visits, which would copy the
    zygote's pages into each engine (docs/benchmarks.md, session 29: 59-154 MB of the service's
    memory)."""
    probe = subprocess.run(
        [sys.executable, "-c", _FORK_PROBE],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        check=True,
        timeout=120,
    )
    child = json.loads(probe.stdout)
    assert child == {"gc_enabled": True, "visits_preforked": False}
