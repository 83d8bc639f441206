"""Edits of a whole Ray Serve config for the model-management routes: add, remove, unload and
load a model. Each returns a new config, validated as config/serve.yaml is; deploying it is what
`serve deploy` of that file would do (deployments/model_admin.py)."""

from __future__ import annotations

import copy
from typing import Any

from serve_app.config import (
    COLD_START_METRICS_INTERVAL_S,
    INGRESS_DEPLOYMENT,
    ModelConfig,
    app_config_from_applications,
)
from serve_app.errors import ConflictError, InvalidRequestError, ModelNotFoundError

MODEL_IMPORT_PATH = "deployments.app:build_model_app"
# An unloaded model: scaled to zero as soon as no request is open, woken by the next one
# (Ollama's keep_alive 0). Lightweight options only, so Serve restarts nothing to apply them.
UNLOADED_AUTOSCALING = {
    "min_replicas": 0,
    "initial_replicas": 0,
    "downscale_delay_s": 0.0,
    "downscale_to_zero_delay_s": 0.0,
    "upscale_delay_s": 0.0,
    "look_back_period_s": 1.0,
    "metrics_interval_s": COLD_START_METRICS_INTERVAL_S,  # the next request is seen at once
}


def add_model(config: dict[str, Any], model: ModelConfig) -> dict[str, Any]:
    """`config` with `model` as an application of its own and a route in the ingress."""
    if model.id in model_ids(config):
        raise ConflictError(f"Model '{model.id}' already exists.", param="id", code="model_exists")
    edited = copy.deepcopy(config)
    application = {
        "name": model.id,
        "route_prefix": None,
        "import_path": MODEL_IMPORT_PATH,
        "args": {"cache_dir": _cache_dir(edited), "model": model.model_dump(mode="json")},
    }
    edited["applications"].append(application)
    _routes(edited).append({"id": model.id, "kind": model.kind})
    return checked(edited)


def remove_model(config: dict[str, Any], model_id: str) -> dict[str, Any]:
    """`config` without the model's application and route."""
    _model_application(config, model_id)  # 404 when unknown
    if len(model_ids(config)) == 1:
        raise InvalidRequestError(
            f"Model '{model_id}' is the only model; the service needs at least one.",
            param="model_id",
            code="last_model",
        )
    edited = copy.deepcopy(config)
    edited["applications"] = [
        app for app in edited["applications"] if _model_id_of(app) != model_id
    ]
    routes = _routes(edited)
    routes[:] = [route for route in routes if route["id"] != model_id]
    return checked(edited)


def set_unloaded(config: dict[str, Any], model_id: str, is_unloaded: bool) -> dict[str, Any]:
    """`config` with the model's deployment scaled to zero, or back to its own replica counts:
    both an override of its autoscaling in the application's `deployments`. Loading keeps an
    override (of the model's own counts) rather than dropping it: Ray 2.60 hashes whether a
    deployment has an autoscaling override into the code version, so adding or dropping one
    restarts the model, while changing one does not."""
    edited = copy.deepcopy(config)
    application = _model_application(edited, model_id)
    overrides = [d for d in application.get("deployments") or [] if d.get("name") != model_id]
    overrides.append(_autoscaling_override(application, is_unloaded))
    application["deployments"] = overrides
    return checked(edited)


def is_unloaded(config: dict[str, Any], model_id: str) -> bool:
    application = _model_application(config, model_id)
    overrides = [d for d in application.get("deployments") or [] if d.get("name") == model_id]
    return any(_is_unloaded_autoscaling(d.get("autoscaling_config") or {}) for d in overrides)


def _is_unloaded_autoscaling(autoscaling: dict[str, Any]) -> bool:
    return all(autoscaling.get(key) == value for key, value in UNLOADED_AUTOSCALING.items())


def model_ids(config: dict[str, Any]) -> list[str]:
    return [model_id for app in config["applications"] if (model_id := _model_id_of(app))]


def model_entry(config: dict[str, Any], model_id: str) -> dict[str, Any]:
    entry: dict[str, Any] = _model_application(config, model_id)["args"]["model"]
    return entry


def checked(config: dict[str, Any]) -> dict[str, Any]:
    """`config` if it reads back as a valid service (the checks config/serve.yaml gets)."""
    try:
        app_config_from_applications(config["applications"])
    except ValueError as exc:
        raise InvalidRequestError(f"The resulting config is invalid: {exc}", param=None) from exc
    return config


def _autoscaling_override(application: dict[str, Any], is_unloaded: bool) -> dict[str, Any]:
    """The model's own replica counts as an autoscaling config (a fixed count as min = max),
    or, unloaded, the same scaled to zero whenever no request is open."""
    model = ModelConfig.model_validate(application["args"]["model"])
    options = model.serve_deployment()
    if options.autoscaling_config is not None:
        own = dict(options.autoscaling_config)
    else:
        count = options.num_replicas if isinstance(options.num_replicas, int) else 1
        own = {"min_replicas": count, "max_replicas": count, "initial_replicas": count}
    own["max_replicas"] = max(1, own.get("max_replicas", 1))
    autoscaling = {**own, **UNLOADED_AUTOSCALING} if is_unloaded else own
    # "auto" lets Serve take an autoscaling config where the code set a fixed count.
    return {"name": model.id, "num_replicas": "auto", "autoscaling_config": autoscaling}


def _model_id_of(application: dict[str, Any]) -> str | None:
    model = (application.get("args") or {}).get("model")
    return model.get("id") if isinstance(model, dict) else None


def _model_application(config: dict[str, Any], model_id: str) -> dict[str, Any]:
    for application in config["applications"]:
        if _model_id_of(application) == model_id:
            return application
    raise ModelNotFoundError(model_id)


def _routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The routing table to edit, in the Ingress deployment's user_config: Serve applies a new
    user_config to the running ingress (`Ingress.reconfigure`), where new args would restart it
    and hold every new request until its replacement is up."""
    for application in config["applications"]:
        args = application.get("args") or {}
        if not isinstance(args.get("models"), list):
            continue
        deployments = application.setdefault("deployments", [])
        ingress = next((d for d in deployments if d.get("name") == INGRESS_DEPLOYMENT), None)
        if ingress is None:
            ingress = {"name": INGRESS_DEPLOYMENT}
            deployments.append(ingress)
        user_config = ingress.setdefault("user_config", {})
        routes: list[dict[str, Any]] = user_config.setdefault(
            "models", copy.deepcopy(args["models"])
        )
        return routes
    raise InvalidRequestError("The running config has no ingress application.", param=None)


def _cache_dir(config: dict[str, Any]) -> str:
    for application in config["applications"]:
        cache_dir = (application.get("args") or {}).get("cache_dir")
        if cache_dir and _model_id_of(application):
            return str(cache_dir)
    return "~/.cache/serve-app"
