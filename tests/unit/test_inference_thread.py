"""InferenceThread: jobs run in order on one thread, exceptions reach the caller, stop ends it."""

from __future__ import annotations

import threading

import pytest

from serve_app.engine.inference_thread import InferenceThread


def test_jobs_run_in_order_on_one_thread_that_is_not_the_callers() -> None:
    worker = InferenceThread()
    seen: list[tuple[int, threading.Thread]] = []
    futures = [
        worker.submit(lambda i=i: seen.append((i, threading.current_thread()))) for i in range(5)
    ]
    assert worker.call(lambda: "done") == "done"
    assert all(future.done() for future in futures)
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert {thread for _, thread in seen} == {worker.thread} != {threading.current_thread()}
    worker.stop()
    worker.thread.join(timeout=5)
    assert not worker.thread.is_alive()


def test_a_failing_job_raises_in_the_caller_and_the_thread_goes_on() -> None:
    worker = InferenceThread()

    def fail() -> None:
        raise SystemExit("the loop ended")  # BaseException too: is_alive reads the future

    future = worker.submit(fail)
    with pytest.raises(SystemExit):
        future.result(timeout=5)
    assert worker.call(lambda: 42) == 42
    worker.stop()
    worker.thread.join(timeout=5)
    assert not worker.thread.is_alive()
