"""Interleaved rounds: each target once per level per round, the order reversed every other
round, so this VM's drift (~30% within an hour) hits every target alike. A ratio between two
targets is the median over rounds of their same-round ratios, never a ratio of figures taken
minutes apart.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import httpx

from peers.loadgen import Quiet, Sender, format_row, http_sender, run_level
from peers.targets import Server

MakeSender = Callable[[int, str], Sender]  # (max_tokens, request tag) -> sender


def http_maker(client: httpx.AsyncClient, server: Server) -> MakeSender:
    def make(max_tokens: int, _tag: str) -> Sender:
        return http_sender(client, server.base_url, server.model, max_tokens)

    return make


async def interleaved_rounds(
    senders: dict[str, MakeSender],
    sessions: dict[str, Quiet],
    rounds: int,
    levels: list[tuple[int, int]],
    max_tokens: int,
    timeout_s: float,
) -> list[dict[str, Any]]:
    """Every (round, level, target) measured once; rows carry `round` and `target`."""
    for make in senders.values():  # warm-up: first requests, batching
        await run_level(make(16, "warm"), 4, 4, 300)
    rows: list[dict[str, Any]] = []
    for round_index in range(rounds):
        order = list(senders) if round_index % 2 == 0 else list(reversed(senders))
        for concurrency, num_requests in levels:
            for name in order:
                send = senders[name](max_tokens, f"r{round_index}c{concurrency}")
                row = await run_level(send, concurrency, num_requests, timeout_s, sessions[name])
                row.update(round=round_index, target=name)
                rows.append(row)
                print(f"round {round_index} " + format_row(name, row), flush=True)
    return rows


def median_ratio(
    rows: list[dict[str, Any]], a: str, b: str, concurrency: int, key: str = "output_tok_s"
) -> float | None:
    """Median over rounds of a's `key` / b's `key` at `concurrency` (rounds missing either or
    with a zero/None denominator are skipped; None when no round has both)."""

    def value(round_index: int, name: str) -> float | None:
        wanted = (round_index, name, concurrency)
        for row in rows:
            if (row["round"], row["target"], row["concurrency"]) == wanted:
                return row.get(key)
        return None

    ratios = []
    for round_index in sorted({row["round"] for row in rows}):
        top, bottom = value(round_index, a), value(round_index, b)
        if top is not None and bottom:
            ratios.append(top / bottom)
    return statistics.median(ratios) if ratios else None
