"""The one OS thread that does all of an engine's torch work: loading the model, then the step
loop. OpenMP (libgomp) keeps a team of worker threads for each thread that ran parallel torch
code; once a second team has existed, libgomp counts more threads than cores and stops
spin-waiting between parallel regions, so each of the hundreds of regions of a decode step waits
for a sleeping worker. Measured on this 2-core VM (SmolLM2 native, batch 1): 25-28 ms a step
when one thread loads and steps, 40-54 ms when the model was loaded in a thread that had exited
before another thread ran the steps (docs/benchmarks.md, session 16).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[[], Any], Future[Any]]


class InferenceThread:
    """A daemon thread running the callables given to it, one after another, in order."""

    def __init__(self, name: str = "inference") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Runs fn on the thread after what was submitted before; its result or exception
        lands in the returned future."""
        future: Future[T] = Future()
        self._jobs.put((fn, future))
        return future

    def call(self, fn: Callable[[], T]) -> T:
        """Runs fn on the thread and waits for its result (its exception is raised here)."""
        return self.submit(fn).result()

    def stop(self) -> None:
        """The thread ends after the jobs already submitted."""
        self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)
