"""deployments/model_admin.py's read of the running config against a faked controller: an
application Serve still lists while it is being deleted is not one deployed without a config."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from ray import serve
from ray.serve.schema import ServeApplicationSchema

import deployments.model_admin as model_admin
from serve_app.errors import ConflictError

KEPT = ServeApplicationSchema(name="kept", import_path="deployments.app:build_model_app")


def fake_controller(
    monkeypatch: pytest.MonkeyPatch, configs: dict[str, Any], statuses: dict[str, str]
) -> None:
    get_app_configs = SimpleNamespace(remote=lambda: configs)
    client = SimpleNamespace(_controller=SimpleNamespace(get_app_configs=get_app_configs))
    monkeypatch.setattr(model_admin, "_client", lambda: client)
    monkeypatch.setattr(model_admin.ray, "get", lambda ref: ref)
    applications = {name: SimpleNamespace(status=status) for name, status in statuses.items()}
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications=applications))


def test_an_application_being_deleted_is_not_read_as_deployed_without_a_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A removed model's application stays listed (DELETING) while its replica stops; a model
    added again with the same id right after must not be refused for it."""
    fake_controller(monkeypatch, {"kept": KEPT}, {"kept": "RUNNING", "removed": "DELETING"})
    assert [app["name"] for app in model_admin.read_running_applications()] == ["kept"]


def test_an_application_deployed_without_a_config_refuses_model_management(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_controller(monkeypatch, {"kept": KEPT}, {"kept": "RUNNING", "by_code": "RUNNING"})
    with pytest.raises(ConflictError) as raised:
        model_admin.read_running_applications()
    assert raised.value.code == "not_deployed_from_config" and "by_code" in str(raised.value)
