"""The application builders named by config/serve.yaml's import_paths.

One Serve application per model (`build_model_app`: application name = deployment name = model
id, with its own resources, queue limits and autoscaling), plus the ingress application
(`build_ingress_app`), which reaches each model by name. Serve re-hashes an application's code
version from its args, so a change to one model's args restarts only that model's replicas
(docs/operations.md).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application, Deployment

from deployments.embedding_server import EmbeddingServer
from deployments.ingress import IngressDeployment
from deployments.llm_server import LLMServer
from serve_app.config import DeploymentOptions, IngressAppConfig, ModelAppConfig, ModelConfig

# The replica half of Ray Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED mode: user code and the
# handles' router on the replica's own event loop (no hop to a second thread per message), and
# streams between deployments over gRPC. The ingress spends ~0.55 ms of CPU per streamed token
# instead of ~0.9 ms (docs/benchmarks.md). Set here, not in the environment of `serve run`, so
# every way of starting the service gets them; a model's own ray_actor_options.runtime_env
# env_vars override them.
REPLICA_ENV_VARS = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}


def build_model_app(args: dict[str, Any]) -> Application:
    """One model as its own application; `args` is `{cache_dir, model}` (ModelAppConfig)."""
    config = ModelAppConfig.model_validate(args)
    return _model_app(config.model, config.cache_dir)


def build_ingress_app(args: dict[str, Any]) -> Application:
    """The ingress alone; `args` is `{models: [{id, kind}], ingress}` (IngressAppConfig)."""
    config = IngressAppConfig.model_validate(args)
    ingress = IngressDeployment.options(**serve_options(config.ingress.deployment))
    return ingress.bind(config.model_dump(mode="json"))


def _model_app(model: ModelConfig, cache_dir: str) -> Application:
    server: Deployment = EmbeddingServer if model.kind == "embedding" else LLMServer  # type: ignore[assignment]
    options = serve_options(model.serve_deployment())
    return server.options(name=model.id, **options).bind(model.model_dump(mode="json"), cache_dir)


def serve_options(deployment: DeploymentOptions) -> dict[str, Any]:
    """`.options()` of a deployment: its config, with REPLICA_ENV_VARS under its own env_vars."""
    options = deployment.to_serve_options()
    actor_options = dict(options.get("ray_actor_options") or {})
    runtime_env = dict(actor_options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**REPLICA_ENV_VARS, **(runtime_env.get("env_vars") or {})}
    actor_options["runtime_env"] = runtime_env
    options["ray_actor_options"] = actor_options
    return options
