"""The thread governor (serve_app/engine/thread_governor.py) on a fake clock: one thread once the
recent layers of a decode step run slower than that batch size's quiet ones (one late layer is
not enough), all threads again after the retry wait, kept when they beat one thread's layers,
the wait doubling while contention lasts; and its hooks on a real model's decoder layers."""

from __future__ import annotations

from pathlib import Path

import torch

from serve_app.engine.thread_governor import (
    FIRST_RETRY_S,
    MAX_RETRY_S,
    ThreadGovernor,
    govern_decoder_layers,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[ThreadGovernor, Clock, list[int]]:
    clock, calls = Clock(), []
    return ThreadGovernor(2, calls.append, clock), clock, calls


def step(governor: ThreadGovernor, clock: Clock, layer_s: list[float], rows: int = 1) -> None:
    """One decode step whose layers take `layer_s` seconds each."""
    governor.start_step(rows)
    governor.layer_done()  # before the first layer
    for seconds in layer_s:
        clock.now += seconds
        governor.layer_done()
    governor.end_step()


QUIET = [0.002, 0.0021, 0.0019, 0.0024, 0.002, 0.0018] * 5  # 30 layers, with the usual jitter
CONTENDED = [0.006] * 30  # measured: a contended two-thread layer is 2.6-3.2x a quiet one
ONE_THREAD = [0.0028] * 30  # and one thread's 1.3-1.5x


def test_steady_layers_keep_every_thread() -> None:
    governor, clock, calls = make()
    for _ in range(50):
        step(governor, clock, QUIET)
    assert calls == [] and governor.current == 2 and governor.num_drops == 0


def test_slow_layers_drop_to_one_thread_within_the_step() -> None:
    governor, clock, calls = make()
    for _ in range(5):
        step(governor, clock, QUIET)
    governor.start_step(1)
    governor.layer_done()
    for seconds in [0.002] * 3 + [0.006] * 3:  # another process took a core
        clock.now += seconds
        governor.layer_done()
    assert calls == [1] and governor.current == 1  # the rest of this step runs on one thread


def test_one_late_layer_is_not_contention() -> None:
    governor, clock, calls = make()
    for _ in range(5):
        step(governor, clock, QUIET)
    step(governor, clock, QUIET[:10] + [0.080] + QUIET[:19])  # a preemption of one layer
    step(governor, clock, QUIET[:10] + [0.030, 0.030] + QUIET[:18])  # two, in a window of five
    assert calls == [] and governor.current == 2


def test_a_larger_batch_has_its_own_quiet_time() -> None:
    governor, clock, calls = make()
    for _ in range(5):
        step(governor, clock, QUIET, rows=1)
    for _ in range(5):  # 16 rows: layers ~1.85x those of one row, measured
        step(governor, clock, [1.85 * s for s in QUIET], rows=16)
    step(governor, clock, QUIET, rows=1)
    assert calls == []
    step(governor, clock, [3 * 1.85 * s for s in QUIET], rows=16)
    assert calls == [1]


def test_contention_does_not_become_the_quiet_time() -> None:
    governor, clock, calls = make()
    step(governor, clock, QUIET)
    for _ in range(200):  # a long bout, retried every time it is due
        step(governor, clock, CONTENDED)
        clock.now += MAX_RETRY_S
    assert governor.num_drops == 200


def test_it_retries_after_the_wait_and_waits_longer_while_contended() -> None:
    governor, clock, calls = make()
    step(governor, clock, QUIET)
    step(governor, clock, CONTENDED)  # contended: one thread
    clock.now += FIRST_RETRY_S / 2
    step(governor, clock, ONE_THREAD)  # one-thread layers are only recorded
    assert calls == [1]
    clock.now += FIRST_RETRY_S
    step(governor, clock, CONTENDED)  # retried with two threads: still contended
    assert calls == [1, 2, 1]
    clock.now += FIRST_RETRY_S + 0.1
    step(governor, clock, ONE_THREAD)  # the wait doubled: not yet
    assert calls == [1, 2, 1]
    clock.now += FIRST_RETRY_S
    step(governor, clock, QUIET)  # contention over: two threads stay
    assert calls == [1, 2, 1, 2] and governor.current == 2


def test_the_wait_is_capped_and_resets_once_contention_is_over() -> None:
    governor, clock, calls = make()
    step(governor, clock, QUIET)
    for _ in range(12):  # contended for minutes
        step(governor, clock, CONTENDED)
        clock.now += MAX_RETRY_S + 0.1
    assert governor._retry_s == MAX_RETRY_S
    step(governor, clock, QUIET)  # retried and fine
    clock.now += 60
    step(governor, clock, CONTENDED)  # a new, unrelated bout: retried soon again
    assert governor._retry_s == FIRST_RETRY_S


def test_layers_outside_a_decode_step_are_not_judged() -> None:
    governor, clock, calls = make()
    step(governor, clock, QUIET)
    for _ in range(10):  # a long prefill between steps
        clock.now += 5.0
        governor.layer_done()
    assert calls == []


def test_it_hooks_every_decoder_layer_of_a_model(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    governor, clock, calls = make()
    assert govern_decoder_layers(model, governor)
    seen: list[float] = []
    governor.layer_done = lambda: seen.append(0.0)  # type: ignore[method-assign]
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert len(seen) == model.config.num_hidden_layers + 1  # before each layer, after the last


def test_a_grown_context_does_not_keep_the_engine_on_one_thread() -> None:
    """A long stream's layers slow as its context grows, past SLOW_FACTOR x a quiet time that
    follows them only slowly: that drop is undone at the retry, where two threads beat one,
    and their time becomes the quiet one (the served engine stayed on one thread before)."""
    governor, clock, calls = make()
    for _ in range(5):
        step(governor, clock, QUIET)
    grown = [2.5 * s for s in QUIET]  # the same batch, a longer context, no contention
    step(governor, clock, grown)
    assert calls == [1]  # taken for contention
    step(governor, clock, [1.4 * s for s in grown])  # one thread: 1.4x slower, recorded
    clock.now += FIRST_RETRY_S
    for _ in range(20):
        step(governor, clock, grown)
    assert calls == [1, 2] and governor.current == 2 and governor.num_drops == 1
    step(governor, clock, [3 * s for s in grown])  # real contention is still seen
    assert calls == [1, 2, 1]
