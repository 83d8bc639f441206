"""The app's arguments in config/serve.yaml (models, sources, engine and deployment options)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ModelKind = Literal["chat", "completion", "embedding"]

# What each kind of model can be asked through the API.
CAPABILITIES: dict[str, list[str]] = {
    "chat": ["chat", "completions"],
    "completion": ["completions"],
    "embedding": ["embeddings"],
}

DEFAULT_CACHE_DIR = "~/.cache/serve-app"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineOptions(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the replica has a GPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: fp32 CPU, bf16 GPU
    max_num_seqs: int = Field(16, ge=1, description="rows in the running batch")
    max_model_len: int | None = Field(None, ge=16, description="caps the model's context")
    max_prefill_tokens: int = Field(
        4096, ge=16, description="padded tokens of requests prefilled together in one forward"
    )
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads on CPU")
    default_max_tokens: int | None = Field(
        None, ge=1, description="max_tokens when a request gives none (None: rest of context)"
    )
    max_batch_size: int = Field(32, ge=1, description="embeddings: inputs per forward pass")
    quantization: Literal["none", "int8"] = Field(
        "none", description="int8: torch dynamic int8 Linear layers (CPU only; see docs)"
    )


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

    def to_serve_options(self) -> dict[str, Any]:
        options = self.model_dump(exclude_none=True)
        if self.autoscaling_config is not None:
            options.pop("num_replicas", None)
        return options


class ModelConfig(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    kind: ModelKind
    source: str = Field(
        description="pkg://<package>/<path>, pkg-assemble://<package>, hf://<repo id>, or a path"
    )
    revision: str | None = None
    trust_remote_code: bool = False
    engine: EngineOptions = Field(default_factory=EngineOptions)
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)

    @property
    def capabilities(self) -> list[str]:
        return CAPABILITIES[self.kind]


class IngressOptions(_Strict):
    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(
            ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000
        )
    )
    api_keys: list[str] = Field(
        default_factory=list, description="Bearer keys; also read from $SERVE_APP_API_KEYS"
    )
    request_timeout_s: float | None = Field(
        600.0, gt=0, description="deadline of one generation; a stream then ends in an error"
    )


class AppConfig(_Strict):
    cache_dir: str = DEFAULT_CACHE_DIR
    models: list[ModelConfig] = Field(min_length=1)
    ingress: IngressOptions = Field(default_factory=IngressOptions)

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        ids = [m.id for m in models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"duplicate model ids: {duplicates}")
        return models

    @model_validator(mode="after")
    def _expand_cache_dir(self) -> AppConfig:
        self.cache_dir = str(Path(os.path.expandvars(self.cache_dir)).expanduser())
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
    """Reads the `args` of our application out of a Ray Serve config file."""
    apps = load_serve_config(path).get("applications") or []
    for app in apps:
        if app_name is None or app.get("name") == app_name:
            return AppConfig.model_validate(app.get("args") or {})
    raise ValueError(f"{path}: no application named {app_name!r}")
