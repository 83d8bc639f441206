"""torch's intra-op threads, down to one while another process holds a core, back after.

The CPU engine runs its decode step on `torch_threads` OpenMP threads (2 on this 2-core VM),
which meet at a barrier hundreds of times a step. When another process takes one core (a model
being added or woken imports torch beside it), every barrier waits for the descheduled thread:
measured here, SmolLM2 decode steps at one row went from ~20 ms to 1.1-1.4 s each for as long as
the other process ran. One thread has no barrier; it shares its core and keeps steps in tens
of milliseconds.

So the governor times each decoder layer of a decode step (a forward pre-hook per layer): a
layer far slower than the running typical one means the cores are contended, and the rest of
that step already runs on one thread. After `retry_s` it tries all threads again (a contended
retry costs one slow layer, not a step); the wait doubles while contention lasts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# A layer this many times slower than typical (and slower than MIN_SLOW_S) reads as contended.
# Batch growth moves the typical time gradually and by less (SmolLM2: ~5x from 1 to 16 rows).
SLOW_FACTOR = 10.0
MIN_SLOW_S = 0.010
_WEIGHT = 0.05  # the typical layer time's moving average
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0


class ThreadGovernor:
    def __init__(
        self,
        threads: int,
        set_threads: Callable[[int], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threads = threads
        self.current = threads
        self.num_drops = 0  # times contention was seen
        self._set_threads = set_threads
        self._clock = clock
        self._typical: float | None = None
        self._layer_started: float | None = None
        self._dropped_at = 0.0
        self._retried_at = float("-inf")
        self._retry_s = FIRST_RETRY_S

    def start_step(self) -> None:
        """A decode step begins: its layers are timed (prefills vary too much to judge)."""
        now = self._clock()
        self._layer_started = now
        if self.current < self.threads and now - self._dropped_at >= self._retry_s:
            self._retried_at = now  # the first slow layer drops it again at once
            self._use(self.threads)

    def end_step(self) -> None:
        self._layer_started = None

    def layer_done(self) -> None:
        """Called between layers of a decode step (and after the last)."""
        if self._layer_started is None:
            return
        now = self._clock()
        seconds, self._layer_started = now - self._layer_started, now
        if self.current < self.threads:
            return  # one-thread times say nothing of the full team's
        typical = self._typical
        if typical is not None and seconds > max(SLOW_FACTOR * typical, MIN_SLOW_S):
            logger.info("layer %.0f ms, typical %.1f ms: one thread", 1e3 * seconds, 1e3 * typical)
            self._drop(now)
            return
        self._typical = seconds if typical is None else typical + _WEIGHT * (seconds - typical)

    def _drop(self, now: float) -> None:
        still_contended = now - self._retried_at < 1.0  # dropped again right after a retry
        self._retry_s = min(MAX_RETRY_S, 2 * self._retry_s) if still_contended else FIRST_RETRY_S
        self._dropped_at = now
        self.num_drops += 1
        self._use(1)

    def _use(self, threads: int) -> None:
        self.current = threads
        self._set_threads(threads)


def govern_decoder_layers(model: Any, governor: ThreadGovernor) -> bool:
    """Times `model`'s decoder layers for the governor; False if it has no layer list."""
    layers = _decoder_layers(model)
    if layers is None:
        return False
    for layer in layers:
        layer.register_forward_pre_hook(lambda *_: governor.layer_done())
    layers[-1].register_forward_hook(lambda *_: governor.layer_done())
    return True


def _decoder_layers(model: Any) -> Any:
    """The ModuleList of the model's num_hidden_layers decoder layers (Llama, Gemma, ...)."""
    import torch

    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    return None
