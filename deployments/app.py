"""The application builder named by config/serve.yaml's import_path.

Each model in the config becomes its own deployment (named after the model id, with its own
resources, queue limits and autoscaling); the ingress gets one handle per model.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application, Deployment

from deployments.embedding_server import EmbeddingServer
from deployments.ingress import IngressDeployment
from deployments.llm_server import LLMServer
from serve_app.config import AppConfig, ModelConfig


def build_app(args: dict[str, Any]) -> Application:
    config = AppConfig.model_validate(args)
    model_apps = {model.id: _model_app(model, config.cache_dir) for model in config.models}
    ingress = IngressDeployment.options(**config.ingress.deployment.to_serve_options())
    return ingress.bind(config.model_dump(mode="json"), model_apps)


def _model_app(model: ModelConfig, cache_dir: str) -> Application:
    server: Deployment = EmbeddingServer if model.kind == "embedding" else LLMServer  # type: ignore[assignment]
    options = model.deployment.to_serve_options()
    return server.options(name=model.id, **options).bind(model.model_dump(mode="json"), cache_dir)
