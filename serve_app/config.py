"""The applications' arguments in config/serve.yaml (models, sources, engine and deployment
options), and reading them back out of a Ray Serve config file as one view."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_serializer,
    field_validator,
    model_validator,
)

from serve_app.reasoning import ReasoningParser

ModelKind = Literal["chat", "completion", "embedding"]

# What each kind of model can be asked through the API.
CAPABILITIES: dict[str, list[str]] = {
    "chat": ["chat", "completions"],
    "completion": ["completions"],
    "embedding": ["embeddings"],
}

DEFAULT_CACHE_DIR = "~/.cache/serve-app"
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_unique_ids(ids: list[str]) -> None:
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate model ids: {duplicates}")


def _expand(path: str) -> str:
    return str(Path(os.path.expandvars(path)).expanduser())


class EngineOptions(_Strict):
    """Engine options of one model. Shared ones first; the rest apply to one kind of model
    only (LLM_ONLY_OPTIONS, EMBEDDING_ONLY_OPTIONS), and ModelConfig refuses the other kind's."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the replica has a GPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 CPU, bf16 GPU
    max_model_len: int | None = Field(None, ge=16, description="caps the model's context")
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads on CPU")
    prepack_linear: bool = Field(
        True, description="CPU float32: Linear weights prepacked once for oneDNN (faster matmuls)"
    )
    weights: Literal["float32", "native"] = Field(
        "native",
        description="GGUF LLMs on CPU: native keeps the file's 4-bit weights (int4 kernel) "
        "and its other quantized types as bf16 (no float32 conversion); float32 dequantizes "
        "once to a safetensors cache (a GPU replica always loads that)",
    )
    # LLMs (kind chat or completion) only:
    max_num_seqs: int = Field(16, ge=1, description="rows in the running batch")
    max_prefill_tokens: int = Field(
        256,
        ge=16,
        description="prefill tokens per engine iteration; longer prompts are prefilled in chunks",
    )
    data_parallel_size: int = Field(
        1,
        ge=1,
        description="engine processes per replica, each with its own copy of the model, KV "
        "and prefix cache; a request runs in one (where its prompt's start was computed, "
        "unless busier). On CPU, 2 one-thread engines use 2 cores without the barrier of a "
        "two-thread step. Engine process only",
    )
    max_prefill_rows: int | None = Field(
        None,
        ge=1,
        description="prompts prefilled together in one forward (None: as many as fit); fewer "
        "give a burst of requests its first tokens sooner, a group at a time",
    )
    stream_interval: int = Field(
        1, ge=1, description="tokens per streamed chunk after the first (>1: fewer messages)"
    )
    default_max_tokens: int | None = Field(
        None, ge=1, description="max_tokens when a request gives none (None: rest of context)"
    )
    prefix_cache_tokens: int = Field(
        0,
        ge=0,
        description="tokens of recent prompts/answers whose KV is kept for reuse (0: off)",
    )
    quantization: Literal["none", "int8"] = Field(
        "none", description="int8: torch dynamic int8 Linear layers (CPU only; see docs)"
    )
    fp16_copy_min_rows: int | None = Field(
        None,
        ge=1,
        description="weights: native on CPU: 4-bit layers also keep an fp16 copy (fbgemm, ~3.3 "
        "bytes a weight) for forwards of at least this many rows (Llama family: decode rows "
        "and, with the C kernels, prefill tokens; otherwise every prefill too); ~2x the int4 "
        "kernel there on CPUs without bf16 instructions. None: off",
    )
    reasoning_parser: ReasoningParser | None = Field(
        None,
        description="think_tags: chat text between <think> and </think> -> reasoning_content",
    )
    # Embedding models only:
    max_batch_size: int = Field(32, ge=1, description="embeddings: inputs per forward pass")

    @model_validator(mode="after")
    def _fp16_copies_need_native_weights(self) -> EngineOptions:
        if self.fp16_copy_min_rows is not None and (
            self.weights != "native" or self.quantization != "none"
        ):
            raise ValueError(
                "fp16_copy_min_rows copies native 4-bit weights: it needs weights: native and "
                f"quantization: none (got weights: {self.weights}, "
                f"quantization: {self.quantization})"
            )
        return self


LLM_ONLY_OPTIONS = frozenset(
    {
        "max_num_seqs",
        "max_prefill_tokens",
        "max_prefill_rows",
        "data_parallel_size",
        "stream_interval",
        "default_max_tokens",
        "prefix_cache_tokens",
        "quantization",
        "fp16_copy_min_rows",
        "reasoning_parser",
    }
)
EMBEDDING_ONLY_OPTIONS = frozenset({"max_batch_size"})


def options_not_for(kind: ModelKind) -> frozenset[str]:
    """The engine options a model of this kind does not take."""
    return LLM_ONLY_OPTIONS if kind == "embedding" else EMBEDDING_ONLY_OPTIONS


class DeploymentOptions(_Strict):
    """Ray Serve deployment options, passed to `.options()` for this model's deployment."""

    num_replicas: int | Literal["auto"] | None = None
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1})
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(-1, ge=-1)
    autoscaling_config: dict[str, Any] | None = None
    health_check_period_s: float | None = None
    health_check_timeout_s: float | None = None
    graceful_shutdown_timeout_s: float | None = None
    # Serve's RequestRouterConfig; unset, LLM models get the prefix-affinity router
    # (deployments/prefix_router.py)
    request_router_config: dict[str, Any] | None = None

    def to_serve_options(self) -> dict[str, Any]:
        options = self.model_dump(exclude_none=True)
        if self.autoscaling_config is not None:
            options.pop("num_replicas", None)
        return options

    def scaled_to_zero_after(self, idle_timeout_s: float) -> DeploymentOptions:
        """These options with Serve's autoscaling taking the replicas to zero after
        `idle_timeout_s` without a request (Ollama's keep_alive); the first request wakes one."""
        autoscaling = {**_fixed_replicas(self.num_replicas), **(self.autoscaling_config or {})}
        autoscaling.update(min_replicas=0, downscale_to_zero_delay_s=idle_timeout_s)
        autoscaling.setdefault("initial_replicas", 1)  # loaded at start, then idles out
        # Idle means no request over the look-back window, then the delay: keep the window short.
        autoscaling.setdefault("look_back_period_s", min(10.0, idle_timeout_s))
        autoscaling.setdefault("metrics_interval_s", COLD_START_METRICS_INTERVAL_S)
        return self.model_copy(update={"num_replicas": None, "autoscaling_config": autoscaling})


# How often the ingress's handle sends a model's queued requests to the controller (Serve's
# `metrics_interval_s`, default 10 s). At zero replicas that push is what starts a replica: Serve's
# own immediate push on a queued request sends the series recorded before it, so a cold start
# waited for the next periodic push (6-10 s measured, docs/operations.md). Two small controller
# calls a second per model that can scale to zero.
COLD_START_METRICS_INTERVAL_S = 0.5


def _fixed_replicas(num_replicas: int | str | None) -> dict[str, int]:
    count = num_replicas if isinstance(num_replicas, int) and num_replicas > 0 else 1
    return {"max_replicas": count}


class ModelConfig(_Strict):
    id: str = Field(pattern=MODEL_ID_PATTERN)
    kind: ModelKind
    source: str = Field(
        description="pkg://<package>/<path>, pkg-assemble://<package>, hf://<repo id>, or a path"
    )
    revision: str | None = None
    trust_remote_code: bool = False
    engine: EngineOptions = Field(default_factory=EngineOptions)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    idle_timeout_s: float | None = Field(
        None, gt=0, description="no request for this long: replicas scaled to zero (None: never)"
    )

    @property
    def capabilities(self) -> list[str]:
        return CAPABILITIES[self.kind]

    def serve_deployment(self) -> DeploymentOptions:
        """The deployment options Serve gets: `deployment`, scaled to zero when idle if set."""
        if self.idle_timeout_s is None:
            return self.deployment
        return self.deployment.scaled_to_zero_after(self.idle_timeout_s)

    @model_validator(mode="after")
    def _idle_timeout_fits_autoscaling(self) -> ModelConfig:
        floor = (self.deployment.autoscaling_config or {}).get("min_replicas", 0)
        if self.idle_timeout_s is not None and floor:
            raise ValueError(
                f"model '{self.id}': idle_timeout_s scales it to zero, so "
                f"autoscaling_config.min_replicas must be 0 or unset (it is {floor})"
            )
        return self

    @model_validator(mode="after")
    def _engine_options_of_its_kind(self) -> ModelConfig:
        refused = sorted(self.engine.model_fields_set & options_not_for(self.kind))
        if refused:
            takes = "LLMs (kind chat or completion)" if self.kind == "embedding" else "embedding"
            raise ValueError(
                f"model '{self.id}' ({self.kind}): engine option(s) {', '.join(refused)} apply "
                f"to {takes} models only"
            )
        return self

    @field_serializer("engine", mode="wrap")
    def _dump_engine_options_of_its_kind(
        self, engine: EngineOptions, handler: SerializerFunctionWrapHandler
    ) -> dict[str, Any]:
        # Without the other kind's defaults, so the dump validates again (replica args).
        dumped: dict[str, Any] = handler(engine)
        return {k: v for k, v in dumped.items() if k not in options_not_for(self.kind)}


class IngressOptions(_Strict):
    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(
            ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000
        )
    )
    api_keys: list[str] = Field(
        default_factory=list, description="Bearer keys; also read from $SERVE_APP_API_KEYS"
    )
    admin_api_keys: list[str] = Field(
        default_factory=list,
        description="keys for /admin (then api_keys no longer open it); also "
        "$SERVE_APP_ADMIN_API_KEYS",
    )
    config_file: str | None = Field(
        None,
        description="where model changes made through /admin/models are written back as a "
        "whole Serve config, so a restart serves the same set (None: not written)",
    )
    request_timeout_s: float | None = Field(
        600.0, gt=0, description="deadline of one generation; a stream then ends in an error"
    )


class ModelRoute(_Strict):
    """What the ingress knows of a model: its id (= its application's and deployment's name)
    and its kind."""

    id: str = Field(pattern=MODEL_ID_PATTERN)
    kind: ModelKind

    @property
    def capabilities(self) -> list[str]:
        return CAPABILITIES[self.kind]


class IngressAppConfig(_Strict):
    """Args of the ingress application: the routing table and the ingress's own options, none of
    the models' options, so one model's change leaves this application (and its code version)
    alone."""

    models: list[ModelRoute] = Field(min_length=1)
    ingress: IngressOptions = Field(default_factory=IngressOptions)

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: list[ModelRoute]) -> list[ModelRoute]:
        _check_unique_ids([m.id for m in models])
        return models

    def model(self, model_id: str) -> ModelRoute | None:
        return next((m for m in self.models if m.id == model_id), None)


class ModelAppConfig(_Strict):
    """Args of one model's application (application name = deployment name = model id)."""

    cache_dir: str = DEFAULT_CACHE_DIR
    model: ModelConfig

    @model_validator(mode="after")
    def _expand_cache_dir(self) -> ModelAppConfig:
        self.cache_dir = _expand(self.cache_dir)
        return self


class AppConfig(_Strict):
    """A whole Ray Serve config file read back as one view: every model (from its own
    application) and the ingress options (from the ingress application). Not the args of any
    application; `serve-app pull`, the benchmarks and the k8s checks read it."""

    cache_dir: str = DEFAULT_CACHE_DIR
    models: list[ModelConfig] = Field(min_length=1)
    ingress: IngressOptions = Field(default_factory=IngressOptions)

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        _check_unique_ids([m.id for m in models])
        return models

    @model_validator(mode="after")
    def _expand_cache_dir(self) -> AppConfig:
        self.cache_dir = _expand(self.cache_dir)
        return self

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.id == model_id), None)


def load_serve_config(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a Ray Serve config (expected a mapping)")
    return data


def app_config_from_serve_config(path: str | Path, app_name: str | None = None) -> AppConfig:
    """Every model and the ingress options, read out of a Ray Serve config file.

    Its layout is config/serve.yaml's: one application per model (`args.model`) next to the
    ingress application, whose `args.models` routes ids to kinds. `app_name` names the ingress
    application when the file holds more than one service.
    """
    apps = load_serve_config(path).get("applications") or []
    try:
        return app_config_from_applications(apps, app_name)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def app_config_from_applications(
    apps: list[dict[str, Any]], app_name: str | None = None
) -> AppConfig:
    front = next((a for a in apps if app_name in (None, a.get("name")) and _routes(a)), None)
    if front is None:
        raise ValueError(f"no application named {app_name!r} with args.models")
    ingress = IngressAppConfig.model_validate({**front["args"], "models": _routes(front)})
    model_apps = {a.get("name"): a["args"] for a in apps if "model" in (a.get("args") or {})}
    routed = [r.id for r in ingress.models]
    unknown = sorted(set(routed) - set(model_apps))
    unrouted = sorted(set(model_apps) - set(routed), key=str)
    if unknown or unrouted:
        raise ValueError(
            f"the routing table of {front.get('name')!r} and the model applications differ: "
            f"routed without an application {unknown}, applications not routed {unrouted}"
        )
    models = [ModelAppConfig.model_validate(model_apps[model_id]) for model_id in routed]
    for route, app in zip(ingress.models, models, strict=True):
        if (app.model.id, app.model.kind) != (route.id, route.kind):
            raise ValueError(
                f"application {route.id!r} holds model {app.model.id!r} ({app.model.kind}), "
                f"routed as {route.id!r} ({route.kind})"
            )
    cache_dirs = sorted({app.cache_dir for app in models})
    if len(cache_dirs) != 1:
        raise ValueError(f"the model applications name different cache_dirs: {cache_dirs}")
    return AppConfig(
        cache_dir=cache_dirs[0], models=[app.model for app in models], ingress=ingress.ingress
    )


INGRESS_DEPLOYMENT = "Ingress"


def _routes(app: dict[str, Any]) -> list[dict[str, Any]]:
    """The ingress application's routing table: its args' `models`, unless the Ingress
    deployment's user_config holds a newer one (written by /admin/models, applied in place)."""
    routes: list[dict[str, Any]] = (app.get("args") or {}).get("models") or []
    override = ingress_user_config(app).get("models")
    return override if isinstance(override, list) else routes


def ingress_user_config(app: dict[str, Any]) -> dict[str, Any]:
    for deployment in app.get("deployments") or []:
        if deployment.get("name") == INGRESS_DEPLOYMENT:
            return deployment.get("user_config") or {}
    return {}


# ---- editing a parsed Ray Serve config (tests, scripts/multinode_demo.sh) -------------------


def model_entries(serve_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Model id -> its entry (id, kind, source, engine, deployment), editable in place."""
    entries: dict[str, dict[str, Any]] = {}
    for app in serve_config["applications"]:
        args = app.get("args") or {}
        if "model" in args:
            entries[args["model"]["id"]] = args["model"]
    return entries


def ingress_deployment(serve_config: dict[str, Any]) -> dict[str, Any]:
    """The ingress's deployment options (`args.ingress.deployment`), editable in place."""
    for app in serve_config["applications"]:
        ingress = (app.get("args") or {}).get("ingress")
        if ingress is not None:
            deployment: dict[str, Any] = ingress.setdefault("deployment", {})
            return deployment
    raise KeyError("no application has args.ingress")


def with_models(serve_config: dict[str, Any], model_ids: set[str]) -> dict[str, Any]:
    """A copy of `serve_config` that serves only these models (applications and routes)."""
    config = copy.deepcopy(serve_config)
    kept = []
    for app in config["applications"]:
        args = app.get("args") or {}
        if "model" in args and args["model"]["id"] not in model_ids:
            continue
        if "models" in args:
            args["models"] = [m for m in args["models"] if m["id"] in model_ids]
        kept.append(app)
    config["applications"] = kept
    return config
