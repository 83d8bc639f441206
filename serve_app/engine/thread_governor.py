"""torch's intra-op threads, down to one while another process holds a core, back after.

The CPU engine runs its decode step on `torch_threads` OpenMP threads (2 on this 2-core VM),
which meet at a barrier hundreds of times a step. When another process takes one core (a model
being added or woken imports torch beside it), every barrier waits for the descheduled thread.
Measured here (SmolLM2 decode, a busy-looping process beside it): two threads' steps went from
56 to 214 ms at one row and from 103-112 to 382 ms at 16 rows, their median layer 3.2x and 2.6x
slower; one thread stayed at 69 and 153 ms, its quiet speed. Quiet, one thread is 1.3-1.5x
slower than two.

So the governor times each decoder layer of a decode step (a forward pre-hook per layer)
against the quiet layer time of the same batch size. When the median of the last few layers is
more than SLOW_FACTOR times that, the cores are contended and the rest of the step runs on one
thread. After `retry_s` it tries all threads again (a contended retry costs a few slow layers,
not a step); the wait doubles while contention lasts. A median, not one layer: a single late
layer (a timer tick, a short preemption) is no reason to halve the team for a second.

Decode steps whose every layer is one decode_kernel.c call (Llama models on q4_kernel.c weights)
are not governed where work_pool.c's workers are SCHED_IDLE (the process may lift them back:
q4_native.idle_pool_workers): they give way to other processes by themselves, and its loops
never wait for a worker that has not started (model_runner.py).

A retry is judged against the one-thread layers just before it, not against the quiet time: all
threads stay when they beat one thread by RETRY_GAIN, and their time becomes the quiet one. The
quiet time follows a growing context only slowly (a layer's attention grows with it), so a long
stream can cross SLOW_FACTOR x a stale quiet time, and every retry was judged against that same
stale value (test_thread_governor.py has the case; throughput measured the same either way).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# Contended two-thread layers measured 2.6-3.2x the quiet ones; one thread costs 1.3-1.5x.
SLOW_FACTOR = 2.0
WINDOW = 5  # layers whose median is judged
# The quiet time is a moving average of window medians, quicker down than up (a longer context
# raises it slowly); a median above ACCEPT_FACTOR x quiet does not move it, so contention
# cannot raise it. Not the minimum: the fastest windows are 20-30% under the typical one.
_FALL_WEIGHT = 0.05
_RISE_WEIGHT = 0.01
ACCEPT_FACTOR = 1.5
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0
# A retry keeps all threads when their layers are this much faster than one thread's: quiet,
# two threads are 1.3-1.5x one; contended, they are slower than one.
RETRY_GAIN = 1.1


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
        self._quiet: dict[int, float] = {}  # batch rows -> quiet all-thread layer seconds
        # What the first all-thread window after a retry must beat: the median of the last
        # one-thread layers of the same batch size (None: the quiet time decides).
        self._retry_bar: float | None = None
        self._rows = 0
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self._layer_started: float | None = None
        self._in_step = False
        self._dropped_at = 0.0
        self._retried_at = float("-inf")
        self._retry_s = FIRST_RETRY_S

    def start_step(self, rows: int) -> None:
        """A decode step of `rows` rows begins: its layers are timed (prefills vary too much)."""
        now = self._clock()
        self._in_step, self._layer_started = True, None
        if rows != self._rows:
            self._rows = rows
            self._recent.clear()
        if self.current < self.threads and now - self._dropped_at >= self._retry_s:
            self._retried_at = now  # a few slow layers drop it again at once
            full = len(self._recent) == WINDOW  # one-thread layers (cleared if the rows changed)
            self._retry_bar = statistics.median(self._recent) if full else None
            self._recent.clear()  # the window holds only all-thread layers
            self._use(self.threads)

    def end_step(self) -> None:
        self._in_step, self._layer_started = False, None

    def layer_done(self) -> None:
        """Called before each decoder layer of a decode step and after the last."""
        if not self._in_step:
            return
        now = self._clock()
        started, self._layer_started = self._layer_started, now
        if started is None:
            return  # the first mark of a step
        self._recent.append(now - started)  # one-thread layers: only the next retry's bar
        if self.current < self.threads or len(self._recent) < WINDOW:
            return
        median = statistics.median(self._recent)
        bar, self._retry_bar = self._retry_bar, None
        if bar is not None:
            if median * RETRY_GAIN >= bar:  # all threads no faster than one: still contended
                self._drop(now)
            else:  # contention is over; the context may have grown since the quiet time
                self._quiet[self._rows] = median
            return
        quiet = self._quiet.get(self._rows)
        if quiet is not None and median > SLOW_FACTOR * quiet:
            logger.info(
                "layers %.1f ms, quiet %.1f ms at %d rows: one thread",
                1e3 * median,
                1e3 * quiet,
                self._rows,
            )
            self._drop(now)
            return
        self._quiet[self._rows] = _followed(quiet, median)

    def _drop(self, now: float) -> None:
        still_contended = now - self._retried_at < 1.0  # dropped again right after a retry
        self._retry_s = min(MAX_RETRY_S, 2 * self._retry_s) if still_contended else FIRST_RETRY_S
        self._dropped_at = now
        self.num_drops += 1
        self._recent.clear()
        self._retry_bar = None
        self._use(1)

    def _use(self, threads: int) -> None:
        self.current = threads
        self._set_threads(threads)


def _followed(quiet: float | None, median: float) -> float:
    """The quiet layer time after one more median of all-thread layers."""
    if quiet is None:
        return median
    if median > ACCEPT_FACTOR * quiet:
        return quiet
    weight = _FALL_WEIGHT if median < quiet else _RISE_WEIGHT
    return quiet + weight * (median - quiet)


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
