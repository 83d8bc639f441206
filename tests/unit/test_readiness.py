"""ModelReadiness: Serve's view (cached), one info call per deployment, kept; each model's
status (ready, idle, loading, failed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import deployments.readiness as readiness_module
from deployments.readiness import DeploymentView, ModelReadiness


class Views:
    def __init__(self) -> None:
        self.view = DeploymentView(num_running=1, deployed_at=1.0)
        self.num_reads = 0

    def __call__(self) -> dict[str, DeploymentView]:
        self.num_reads += 1
        return {"m": self.view}


@pytest.fixture()
def views(monkeypatch: pytest.MonkeyPatch) -> Views:
    fake = Views()
    monkeypatch.setattr(readiness_module, "read_deployment_views", fake)
    return fake


async def test_info_is_asked_again_only_after_a_new_deployment(views: Views) -> None:
    answers = [{"ready": False, "context_length": None}, {"ready": True, "context_length": 64}]
    calls: list[str] = []

    async def ask(model_id: str) -> Any:
        calls.append(model_id)
        return answers[len(calls) - 1]

    readiness = ModelReadiness(ask, status_ttl_s=0.0)
    assert await readiness.statuses(["m"]) == {"m": "failed"}
    assert await readiness.statuses(["m"]) == {"m": "failed"} and len(calls) == 1
    views.view = DeploymentView(num_running=1, deployed_at=2.0)  # redeployed
    assert await readiness.statuses(["m"]) == {"m": "ready"}
    assert len(calls) == 2 and readiness.context_length("m") == 64


async def test_failed_info_leaves_serves_view_in_charge_and_is_retried_later(
    views: Views, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    async def ask(model_id: str) -> Any:
        calls.append(model_id)
        raise RuntimeError("queue full")

    readiness = ModelReadiness(ask, status_ttl_s=0.0)
    assert await readiness.statuses(["m"]) == {"m": "ready"}  # RUNNING replica, no answer yet
    assert await readiness.statuses(["m"]) == {"m": "ready"} and len(calls) == 1
    monkeypatch.setattr(readiness_module, "INFO_RETRY_S", 0.0)
    await readiness.statuses(["m"])
    assert len(calls) == 2


async def test_a_starting_replica_or_unknown_model_is_loading(views: Views) -> None:
    async def ask(model_id: str) -> Any:
        return {"ready": True}

    readiness = ModelReadiness(ask, status_ttl_s=0.0)
    views.view = DeploymentView(num_running=0, deployed_at=1.0, num_starting=1)
    assert await readiness.statuses(["m", "other"]) == {"m": "loading", "other": "loading"}


async def test_concurrent_probes_share_one_status_read(views: Views) -> None:
    async def ask(model_id: str) -> Any:
        return {"ready": True}

    readiness = ModelReadiness(ask, status_ttl_s=60.0)
    results = await asyncio.gather(*(readiness.statuses(["m"]) for _ in range(10)))
    assert all(r == {"m": "ready"} for r in results) and views.num_reads == 1


async def test_serves_view_is_read_more_often_while_a_replica_starts(views: Views) -> None:
    """The cached view lives status_ttl_s, but only STARTING_STATUS_TTL_S while it shows a
    replica starting: the probe after a load must not wait out the long cache."""

    async def ask(model_id: str) -> Any:
        return {"ready": True}

    readiness = ModelReadiness(ask, status_ttl_s=60.0)
    views.view = DeploymentView(num_running=0, deployed_at=1.0, num_starting=1)
    assert await readiness.statuses(["m"]) == {"m": "loading"}
    views.view = DeploymentView(num_running=1, deployed_at=1.0)  # the replica is up
    await asyncio.sleep(readiness_module.STARTING_STATUS_TTL_S)
    assert await readiness.statuses(["m"]) == {"m": "ready"} and views.num_reads == 2
    await asyncio.sleep(readiness_module.STARTING_STATUS_TTL_S)  # all running: the long cache
    assert await readiness.statuses(["m"]) == {"m": "ready"} and views.num_reads == 2


async def test_controller_failure_reads_as_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> dict[str, DeploymentView]:
        raise ConnectionError("controller gone")

    monkeypatch.setattr(readiness_module, "read_deployment_views", broken)

    async def ask(model_id: str) -> Any:
        return {"ready": True}

    assert await ModelReadiness(ask).statuses(["m"]) == {"m": "loading"}


def test_views_come_from_serve_status_by_deployment_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from ray.serve._private.common import ReplicaState

    def deployment(num_running: int) -> SimpleNamespace:
        states = {ReplicaState.RUNNING: num_running, ReplicaState.STARTING: 1}
        return SimpleNamespace(status="HEALTHY", replica_states=states, message="")

    applications = {
        "serve-app": SimpleNamespace(
            last_deployed_time_s=5.0, deployments={"Ingress": deployment(1), "m": deployment(0)}
        ),
        "m": SimpleNamespace(last_deployed_time_s=7.0, deployments={"m": deployment(2)}),
    }
    status = SimpleNamespace(applications=applications)
    monkeypatch.setattr(readiness_module.serve, "status", lambda: status)
    views = readiness_module.read_deployment_views()
    assert views["m"] == DeploymentView(num_running=2, deployed_at=7.0, num_starting=1)
    assert views["Ingress"].num_running == 1


@pytest.mark.parametrize(
    ("view", "status"),
    [
        (DeploymentView(num_running=0, deployed_at=1.0), "idle"),  # scaled to zero
        (DeploymentView(0, 1.0, status="DOWNSCALING"), "idle"),  # on its way to zero
        (DeploymentView(0, 1.0, status="UPSCALING"), "loading"),  # woken, no replica yet
        (DeploymentView(0, 1.0, num_starting=1), "loading"),
        (DeploymentView(0, 1.0, status="DEPLOY_FAILED"), "failed"),
        (DeploymentView(0, 1.0, status="UNHEALTHY"), "failed"),
    ],
)
async def test_a_model_without_a_running_replica_is_idle_loading_or_failed(
    views: Views, view: DeploymentView, status: str
) -> None:
    calls: list[str] = []

    async def ask(model_id: str) -> Any:
        calls.append(model_id)
        return {"ready": True}

    views.view = view
    assert await ModelReadiness(ask, status_ttl_s=0.0).statuses(["m"]) == {"m": status}
    assert calls == []  # never a call that would wake an idle model


async def test_a_load_error_is_failed_and_kept(views: Views) -> None:
    async def ask(model_id: str) -> Any:
        return {"ready": False, "error": "no such file"}

    readiness = ModelReadiness(ask, status_ttl_s=0.0)
    assert await readiness.statuses(["m"]) == {"m": "failed"}
    assert readiness.load_error("m") == "no such file"


async def test_a_model_being_woken_reads_loading_until_serve_shows_its_replica(
    views: Views,
) -> None:
    async def ask(model_id: str) -> Any:
        return {"ready": True}

    readiness = ModelReadiness(ask, status_ttl_s=0.0)
    views.view = DeploymentView(num_running=0, deployed_at=1.0)  # Serve has not reacted yet
    assert await readiness.statuses(["m"]) == {"m": "idle"}
    async with readiness.waking("m"), readiness.waking("m"):  # two loads at once
        assert await readiness.statuses(["m"]) == {"m": "loading"}
    async with readiness.waking("m"):
        views.view = DeploymentView(0, 1.0, status="DEPLOY_FAILED")
        assert await readiness.statuses(["m"]) == {"m": "failed"}  # a failure is never hidden
        views.view = DeploymentView(num_running=1, deployed_at=1.0)
        assert await readiness.statuses(["m"]) == {"m": "ready"}
    views.view = DeploymentView(num_running=0, deployed_at=1.0)
    assert await readiness.statuses(["m"]) == {"m": "idle"}  # the mark ends with the load
