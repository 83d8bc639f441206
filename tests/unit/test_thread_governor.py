"""The thread governor (serve_app/engine/thread_governor.py) on a fake clock: one thread from the
first slow layer of a decode step, all threads again after the retry wait, the wait doubling
while contention lasts; and its hooks on a real model's decoder layers."""

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


def step(governor: ThreadGovernor, clock: Clock, layer_s: list[float]) -> None:
    governor.start_step()
    for seconds in layer_s:
        clock.now += seconds
        governor.layer_done()
    governor.end_step()


def test_steady_layers_keep_every_thread() -> None:
    governor, clock, calls = make()
    for _ in range(50):
        step(governor, clock, [0.002] * 30)
    assert calls == [] and governor.current == 2 and governor.num_drops == 0


def test_a_slow_layer_drops_to_one_thread_within_the_step() -> None:
    governor, clock, calls = make()
    for _ in range(5):
        step(governor, clock, [0.002] * 30)
    governor.start_step()
    for seconds in [0.002, 0.002, 0.050]:  # another process took a core
        clock.now += seconds
        governor.layer_done()
    assert calls == [1] and governor.current == 1  # the rest of this step runs on one thread


def test_it_retries_after_the_wait_and_waits_longer_while_contended() -> None:
    governor, clock, calls = make()
    step(governor, clock, [0.002] * 30)
    step(governor, clock, [0.002, 0.060])  # contended: one thread
    clock.now += FIRST_RETRY_S / 2
    step(governor, clock, [0.030] * 30)  # one-thread layers are not judged
    assert calls == [1]
    clock.now += FIRST_RETRY_S
    step(governor, clock, [0.060])  # retried with two threads: still contended
    assert calls == [1, 2, 1]
    clock.now += FIRST_RETRY_S + 0.1
    step(governor, clock, [0.002])  # the wait doubled: not yet
    assert calls == [1, 2, 1]
    clock.now += FIRST_RETRY_S
    step(governor, clock, [0.002] * 30)  # contention over: two threads stay
    assert calls == [1, 2, 1, 2] and governor.current == 2


def test_the_wait_is_capped_and_resets_once_contention_is_over() -> None:
    governor, clock, calls = make()
    step(governor, clock, [0.002] * 30)
    for _ in range(12):  # contended for minutes
        step(governor, clock, [0.060])
        clock.now += MAX_RETRY_S + 0.1
    assert governor._retry_s == MAX_RETRY_S
    step(governor, clock, [0.002] * 30)  # retried and fine
    clock.now += 60
    step(governor, clock, [0.060])  # a new, unrelated bout: retried soon again
    assert governor._retry_s == FIRST_RETRY_S


def test_layers_outside_a_decode_step_are_not_judged() -> None:
    governor, clock, calls = make()
    step(governor, clock, [0.002] * 30)
    clock.now += 5.0  # a long prefill between steps
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
