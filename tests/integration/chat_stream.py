"""A streamed chat completion read in a thread while a test changes the service around it: each
SSE event's data and arrival time, and what went wrong with it."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from serve_app.sse import DONE, iter_data

CHAT = "smollm2-135m-instruct"


@dataclass
class Stream:
    """One streamed chat completion read in a thread; each SSE event's data and arrival time."""

    url: str
    max_tokens: int
    model: str = CHAT
    gap_limit_s: float = 10.0  # the longest pause between two events that is not a problem
    ignore_eos: bool = False  # to max_tokens even past an end of text (a stream of known length)
    events: list[tuple[float, str]] = field(default_factory=list)
    failure: str | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        body = {
            "model": self.model,
            "stream": True,
            "temperature": 0,
            "max_tokens": self.max_tokens,
            "ignore_eos": self.ignore_eos,
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        }
        try:
            with httpx.stream(
                "POST", f"{self.url}/v1/chat/completions", json=body, timeout=120
            ) as response:
                if response.status_code != 200:
                    self.failure = f"HTTP {response.status_code}: {response.read()[:300]!r}"
                    return
                for data in iter_data(response.iter_lines()):
                    self.events.append((time.monotonic(), data))
        except httpx.HTTPError as exc:
            self.failure = f"{type(exc).__name__}: {exc}"

    @property
    def is_done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    @property
    def ended_at(self) -> float:
        return self.events[-1][0] if self.events else float("nan")

    def chunks(self) -> list[dict[str, Any]]:
        return [json.loads(data) for _, data in self.events if data.startswith("{")]

    def problems(self) -> list[str]:
        found = [self.failure] if self.failure else []
        errors = [c for c in self.chunks() if "error" in c]
        if errors:
            found.append(f"the stream carried an error event: {errors[0]['error']}")
        reasons = [c["choices"][0]["finish_reason"] for c in self.chunks() if c.get("choices")]
        if not reasons or reasons[-1] not in ("stop", "length"):
            found.append(f"no finish_reason at the end (last: {reasons[-1:]})")
        if not self.events or self.events[-1][1] != DONE:
            found.append("the stream did not end with data: [DONE]")
        if self.max_gap_s() > self.gap_limit_s:
            found.append(f"tokens paused for {self.max_gap_s():.1f}s (limit {self.gap_limit_s}s)")
        return found

    def max_gap_s(self) -> float:
        times = [t for t, _ in self.events]
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)

    def num_content_events(self) -> int:
        return sum(1 for _, data in self.events if '"content":' in data)
