"""RequestTimer (replica side) counts a request once, under the right counter."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

import deployments.metrics as metrics_module
from deployments.metrics import RequestTimer
from serve_app.engine.types import RequestOutput


class FakeMetric:
    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, str]]] = []

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.calls.append((value, tags))

    observe = set = inc


@pytest.fixture()
def fake_metrics(monkeypatch: pytest.MonkeyPatch) -> Any:
    names = metrics_module.ServeMetrics.__dataclass_fields__
    fake = SimpleNamespace(**{name: FakeMetric() for name in names})
    monkeypatch.setattr(metrics_module, "serve_metrics", lambda: fake)
    return fake


def finish(reason: str) -> RequestOutput:
    # cast: the engine's finish reasons may be an enum of these strings
    return RequestOutput("r", "", 3, 2, finish_reason=cast(Any, reason))


@pytest.mark.parametrize("reason", ["stop", "length"])
def test_finished_requests_count_as_success(fake_metrics: Any, reason: str) -> None:
    timer = RequestTimer("m")
    timer.observe(finish(reason))
    assert fake_metrics.request_success.calls == [(1, {"model": "m", "finished_reason": reason})]


def test_engine_error_is_not_a_success(fake_metrics: Any) -> None:
    timer = RequestTimer("m")
    timer.observe(finish("error"))
    assert fake_metrics.request_success.calls == []
    assert fake_metrics.request_cancelled.calls == []


def test_abort_counts_as_cancelled_not_success(fake_metrics: Any) -> None:
    timer = RequestTimer("m")
    timer.observe(finish("abort"))
    assert timer.is_finished
    assert fake_metrics.request_success.calls == []
    assert fake_metrics.request_cancelled.calls == [(1, {"model": "m"})]
