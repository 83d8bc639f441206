"""config/serve.yaml's layout: one Serve application per model plus the ingress application,
read back whole by app_config_from_serve_config, and the builders its import_paths name."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.config import (
    app_config_from_applications,
    app_config_from_serve_config,
    model_entries,
    with_models,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVE_YAML = REPO_ROOT / "config" / "serve.yaml"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's pydantic usage


def serve_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(SERVE_YAML.read_text(encoding="utf-8"))
    return config


def test_each_model_is_an_application_of_its_own_behind_the_ingress() -> None:
    apps = {app["name"]: app for app in serve_config()["applications"]}
    ingress = apps.pop("serve-app")
    assert ingress["route_prefix"] == "/"
    assert ingress["import_path"] == "deployments.app:build_ingress_app"
    routes = ingress["args"]["models"]
    assert [set(route) for route in routes] == [{"id", "kind"}] * len(routes)  # no model options
    assert {route["id"] for route in routes} == set(apps)
    for name, app in apps.items():
        assert app["route_prefix"] is None  # reached through the ingress only
        assert app["import_path"] == "deployments.app:build_model_app"
        assert app["args"]["model"]["id"] == name


def test_the_whole_config_reads_back_as_before() -> None:
    config = app_config_from_serve_config(SERVE_YAML)
    assert [m.id for m in config.models] == list(model_entries(serve_config()))
    assert config.cache_dir.endswith(".cache/serve-app")
    assert config.ingress.deployment.graceful_shutdown_timeout_s == 630


def test_a_single_application_holding_every_model_is_not_a_layout_any_more() -> None:
    whole = app_config_from_serve_config(SERVE_YAML).model_dump(mode="json")
    single = [{"name": "all", "import_path": "deployments.app:build_app", "args": whole}]
    with pytest.raises(ValueError, match=r"models\.0\.source"):
        app_config_from_applications(single)
    assert not hasattr(importlib.import_module("deployments.app"), "build_app")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda apps: apps.pop(), r"routed without an application \['all-minilm-l6-v2'\]"),
        (lambda apps: apps[0]["args"]["models"].pop(), r"applications not routed \['all-minilm"),
        (lambda apps: apps[0]["args"]["models"][1].update(kind="chat"), "routed as"),
        (lambda apps: apps[2]["args"].update(cache_dir="/elsewhere"), "different cache_dirs"),
    ],
)
def test_a_routing_table_that_disagrees_with_the_model_applications_is_refused(
    edit: Any, message: str
) -> None:
    apps = copy.deepcopy(serve_config()["applications"])
    edit(apps)
    with pytest.raises(ValueError, match=message):
        app_config_from_applications(apps)


def test_with_models_drops_the_applications_and_the_routes() -> None:
    config = with_models(serve_config(), {"smollm2-135m-instruct"})
    assert [app["name"] for app in config["applications"]] == ["serve-app", "smollm2-135m-instruct"]
    assert [m.id for m in app_config_from_applications(config["applications"]).models] == [
        "smollm2-135m-instruct"
    ]


def test_the_builders_name_each_deployment_after_its_model() -> None:
    from deployments.app import build_ingress_app, build_model_app

    apps = {app["name"]: app for app in serve_config()["applications"]}
    model = build_model_app(apps["smollm2-135m-instruct"]["args"])._bound_deployment
    assert model.name == "smollm2-135m-instruct"
    assert model._deployment_config.graceful_shutdown_timeout_s == 630
    ingress = build_ingress_app(apps["serve-app"]["args"])._bound_deployment
    assert ingress.name == "Ingress"
    # Only the routing table is bound: the ingress finds each model's application by name.
    assert len(ingress.init_args) == 1 and "models" in ingress.init_args[0]


def test_a_model_config_can_name_the_prefix_affinity_router() -> None:
    from deployments.app import build_model_app
    from deployments.prefix_router import PREFIX_ROUTER_CONFIG

    def router_of(args: dict[str, Any]) -> str:
        config = build_model_app(args)._bound_deployment._deployment_config
        return str(config.request_router_config.request_router_class)

    apps = {app["name"]: app for app in serve_config()["applications"]}
    ours = "deployments.prefix_router:PrefixAffinityRouter"
    args = apps["smollm2-135m-instruct"]["args"]
    assert router_of(args) != ours  # opt-in: Serve's default router unless named
    args["model"]["deployment"]["request_router_config"] = PREFIX_ROUTER_CONFIG
    assert router_of(args) == ours


def test_every_replica_gets_ray_serves_fast_path_env_unless_its_config_says_otherwise() -> None:
    from deployments.app import REPLICA_ENV_VARS, build_ingress_app, build_model_app

    apps = {app["name"]: app for app in serve_config()["applications"]}
    ingress = build_ingress_app(apps["serve-app"]["args"])._bound_deployment
    model_args = apps["smollm2-135m-instruct"]["args"]
    model = build_model_app(model_args)._bound_deployment
    for deployment in (ingress, model):
        actor_options = deployment.ray_actor_options
        assert actor_options["runtime_env"]["env_vars"] == REPLICA_ENV_VARS
        assert actor_options["num_cpus"] > 0  # the config's own options are kept
    own_env = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0", "OTHER": "1"}
    model_args["model"]["deployment"]["ray_actor_options"]["runtime_env"] = {"env_vars": own_env}
    actor_options = build_model_app(model_args)._bound_deployment.ray_actor_options
    assert actor_options["runtime_env"]["env_vars"] == {**REPLICA_ENV_VARS, **own_env}


def test_benchmark_replica_env_reaches_every_deployment_over_the_defaults() -> None:
    from benchmarks.peers.targets import SMOLLM2_ID, derive_serve_config
    from deployments.app import REPLICA_ENV_VARS, build_ingress_app, build_model_app

    off = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}
    config = derive_serve_config(8123, [SMOLLM2_ID], replica_env=off)
    apps = {app["name"]: app for app in config["applications"]}
    ingress = build_ingress_app(apps["serve-app"]["args"])._bound_deployment
    model = build_model_app(apps[SMOLLM2_ID]["args"])._bound_deployment
    for deployment in (ingress, model):
        assert deployment.ray_actor_options["runtime_env"]["env_vars"] == {
            **REPLICA_ENV_VARS,
            **off,
        }


def test_benchmark_config_can_run_smollm2_at_several_replicas() -> None:
    """benchmarks/serving.py --smollm2-replicas: SmolLM2's deployment at that many replicas
    (a fixed count), the other models as config/serve.yaml has them."""
    from benchmarks.peers.targets import SMOLLM2_ID, derive_serve_config
    from serve_app.config import model_entries

    shipped = model_entries(derive_serve_config(8123, None))
    entries = model_entries(derive_serve_config(8123, None, {"torch_threads": 1}, None, 2))
    autoscaling = entries[SMOLLM2_ID]["deployment"]["autoscaling_config"]
    assert autoscaling["min_replicas"] == autoscaling["max_replicas"] == 2
    assert entries[SMOLLM2_ID]["engine"]["torch_threads"] == 1
    for model_id, entry in entries.items():
        if model_id != SMOLLM2_ID:
            assert entry["deployment"] == shipped[model_id]["deployment"]


def test_benchmark_engine_options_go_to_smollm2_only() -> None:
    """--engine-option max_prefill_tokens=64 (an LLM option) must leave the embedding model's
    config valid (it failed the whole service before); the other models stay as shipped."""
    from benchmarks.peers.targets import SMOLLM2_ID, derive_serve_config
    from serve_app.config import ModelConfig, model_entries

    shipped = model_entries(derive_serve_config(8123, None))
    engine = {"max_prefill_tokens": 64, "torch_threads": 1}
    entries = model_entries(derive_serve_config(8123, None, engine))
    assert entries[SMOLLM2_ID]["engine"]["max_prefill_tokens"] == 64
    for model_id, entry in entries.items():
        ModelConfig.model_validate(entry)
        if model_id != SMOLLM2_ID:
            assert entry == shipped[model_id]
