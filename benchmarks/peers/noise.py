"""CPU noise of the serving benchmark: how many cores other people's processes used meanwhile.

Splits the machine's busy CPU between the server under test (every process in its session, or
this process for the in-process engine), the client (this process) and everyone else (other
engineers' tests and services: the noise).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class CpuSnapshot:
    at: float
    busy_ticks: int  # the whole machine
    server_ticks: int  # the server under test (this process when the engine runs in-process)
    client_ticks: int  # this process, when it is only the client
    server_by_pid: dict[int, int]  # ticks of each process of the server's session


def snapshot(session_id: int | None) -> CpuSnapshot:
    """CPU ticks so far; `session_id` is the server's session, None for the in-process engine."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    server = client = 0
    by_pid = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        ticks = int(rest[11]) + int(rest[12])  # utime + stime
        if int(entry.name) == os.getpid():
            client += ticks
        elif session_id and int(rest[3]) == session_id:
            server += ticks
            by_pid[int(entry.name)] = ticks
    if session_id is None:
        server, client = client, 0
    busy = user + nice + system + irq + softirq + steal
    return CpuSnapshot(time.monotonic(), busy, server, client, by_pid)


def cores_used(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """Average cores busy between two snapshots: all, server, client and everyone else's."""
    seconds = max(after.at - before.at, 1e-6) * _TICKS_PER_S
    total = (after.busy_ticks - before.busy_ticks) / seconds
    server = (after.server_ticks - before.server_ticks) / seconds
    client = (after.client_ticks - before.client_ticks) / seconds
    return {
        "cores_total": total,
        "cores_server": server,
        "cores_client": client,
        "cores_others": max(total - server - client, 0.0),
    }


def server_cores_by_process(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """Cores used by each process of the server (Ray: proxy, ingress, replica, raylet...)."""
    seconds = max(after.at - before.at, 1e-6) * _TICKS_PER_S
    out: dict[str, float] = {}
    for pid, ticks in after.server_by_pid.items():
        name = f"{process_name(pid)} [{pid}]"
        out[name] = (ticks - before.server_by_pid.get(pid, 0)) / seconds
    return dict(sorted(out.items(), key=lambda item: -item[1]))


def process_name(pid: int) -> str:
    try:
        args = (Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") + [b"", b""])[:2]
    except OSError:
        return "?"
    first, second = (a.decode(errors="replace") for a in args)
    if first.startswith("ray::"):
        return first.split(".")[0]
    name = Path(first).name
    return f"{name} {Path(second).name}" if name.startswith("python") else name


async def wait_for_quiet(session_id: int | None, max_cores: float, max_wait_s: float) -> float:
    """Waits (up to max_wait_s) until others use under max_cores for 2 s; returns seconds waited."""
    started = time.monotonic()
    while True:
        before = snapshot(session_id)
        await asyncio.sleep(2.0)
        is_quiet = cores_used(before, snapshot(session_id))["cores_others"] < max_cores
        waited = time.monotonic() - started
        if is_quiet or waited >= max_wait_s:
            return waited
