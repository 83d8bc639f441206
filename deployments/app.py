"""The application builders named by config/serve.yaml's import_paths.

One Serve application per model (`build_model_app`: application name = deployment name = model
id, with its own resources, queue limits and autoscaling), plus the ingress application
(`build_ingress_app`), which reaches each model by name. Serve re-hashes an application's code
version from its args, so a change to one model's args restarts only that model's replicas
(docs/operations.md). `build_app` still serves everything as one application.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application, Deployment

from deployments.embedding_server import EmbeddingServer
from deployments.ingress import IngressDeployment
from deployments.llm_server import LLMServer
from serve_app.config import AppConfig, IngressAppConfig, ModelAppConfig, ModelConfig


def build_model_app(args: dict[str, Any]) -> Application:
    """One model as its own application; `args` is `{cache_dir, model}` (ModelAppConfig)."""
    config = ModelAppConfig.model_validate(args)
    return _model_app(config.model, config.cache_dir)


def build_ingress_app(args: dict[str, Any]) -> Application:
    """The ingress alone; `args` is `{models: [{id, kind}], ingress}` (IngressAppConfig)."""
    config = IngressAppConfig.model_validate(args)
    ingress = IngressDeployment.options(**config.ingress.deployment.to_serve_options())
    return ingress.bind(config.model_dump(mode="json"), None)


def build_app(args: dict[str, Any]) -> Application:
    """Every model and the ingress in one application (any model's change restarts them all)."""
    config = AppConfig.model_validate(args)
    model_apps = {model.id: _model_app(model, config.cache_dir) for model in config.models}
    ingress = IngressDeployment.options(**config.ingress.deployment.to_serve_options())
    return ingress.bind(config.ingress_app_config().model_dump(mode="json"), model_apps)


def _model_app(model: ModelConfig, cache_dir: str) -> Application:
    server: Deployment = EmbeddingServer if model.kind == "embedding" else LLMServer  # type: ignore[assignment]
    options = model.deployment.to_serve_options()
    return server.options(name=model.id, **options).bind(model.model_dump(mode="json"), cache_dir)
