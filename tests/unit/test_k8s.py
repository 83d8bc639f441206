"""The KubeRay manifests in k8s/: valid RayServices, generated from config/serve.yaml, placeable.

No cluster needed: the manifests are checked against the RayService CRD's schema (with unknown
fields rejected), their serveConfigV2 against config/serve.yaml and serve_app.config (the ingress
application's routing table against the model applications, each model's args validated).
"""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from serve_app.config import AppConfig, app_config_from_applications, app_config_from_serve_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_NAME = "ray.io_rayservices.yaml"
# CI runs from a clean clone with shared/ beside the repo; some checkouts carry it inside.
CRD_CANDIDATES = [
    REPO_ROOT.parent / "shared" / "k8s-crds" / CRD_NAME,
    REPO_ROOT / "shared" / "k8s-crds" / CRD_NAME,
]
MANIFESTS = {
    "cpu": REPO_ROOT / "k8s" / "rayservice.yaml",
    "gpu": REPO_ROOT / "k8s" / "rayservice-gpu.yaml",
}
EMBEDDING_MAY_USE_CPU = True  # docs/kubernetes.md: MiniLM stays on CPU in the GPU variant

# Where serveConfigV2 may differ from config/serve.yaml (docs/kubernetes.md lists them).
ALLOWED_DIFFERENCES = [
    r"proxy_location",
    r"http_options\.host",
    r"applications\[\d+\]\.runtime_env",
    r"applications\[\d+\]\.args\.cache_dir",
    r"applications\[\d+\]\.args\.model\.deployment\.ray_actor_options\.num_(cpus|gpus)",
]


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_k8s", REPO_ROOT / "scripts" / "gen_k8s.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_manifest(variant: str) -> dict[str, Any]:
    documents = list(yaml.safe_load_all(MANIFESTS[variant].read_text(encoding="utf-8")))
    assert len(documents) == 1, f"{MANIFESTS[variant]}: expected one YAML document"
    return documents[0]


def serve_config_of(manifest: dict[str, Any]) -> dict[str, Any]:
    serve_config_v2 = manifest["spec"]["serveConfigV2"]
    assert isinstance(serve_config_v2, str), "serveConfigV2 is a YAML string in the CRD"
    return yaml.safe_load(serve_config_v2)


def app_config_of(manifest: dict[str, Any]) -> AppConfig:
    return app_config_from_applications(serve_config_of(manifest)["applications"])


def cluster_of(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterConfig"]


# --- the CRD schema, strict ----------------------------------------------------------------


@pytest.fixture(scope="module")
def crd_schema() -> dict[str, Any]:
    path = next((p for p in CRD_CANDIDATES if p.exists()), None)
    if path is None:
        pytest.skip(f"RayService CRD not found (looked at {', '.join(map(str, CRD_CANDIDATES))})")
    crd = yaml.safe_load(path.read_text(encoding="utf-8"))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def strict(schema: Any) -> Any:
    """The schema with additionalProperties: false on every object that lists its properties.

    A CRD schema leaves it out (the API server prunes unknown fields silently instead), so
    without this a misspelled field would validate and then vanish on `kubectl apply`.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: strict(value) for key, value in schema.items()}
    is_open = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
    if isinstance(schema.get("properties"), dict) and not is_open:
        result["additionalProperties"] = False
    return result


def schema_errors(schema: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft4Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(manifest)
    ]


@pytest.mark.parametrize("variant", sorted(MANIFESTS))
def test_manifest_validates_against_the_crd_with_unknown_fields_rejected(
    variant: str, crd_schema: dict[str, Any]
) -> None:
    manifest = load_manifest(variant)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    assert schema_errors(strict(crd_schema), manifest) == []


@pytest.mark.parametrize(
    ("path", "misspelled"),
    [
        (["spec", "serveConfigV2"], "serveConfigv2"),
        (["spec", "rayClusterConfig", "headGroupSpec", "rayStartParams"], "rayStartParam"),
        (["spec", "rayClusterConfig", "workerGroupSpecs", 0, "replicas"], "replica"),
        (
            [
                "spec",
                "rayClusterConfig",
                "workerGroupSpecs",
                0,
                "template",
                "spec",
                "containers",
                0,
                "resources",
            ],
            "resource",
        ),
    ],
)
def test_a_misspelled_field_is_rejected(
    path: list[str | int], misspelled: str, crd_schema: dict[str, Any]
) -> None:
    manifest = copy.deepcopy(load_manifest("gpu"))
    parent: Any = manifest
    for key in path[:-1]:
        parent = parent[key]
    parent[misspelled] = parent.pop(path[-1])
    # The CRD as shipped accepts it (the API server would drop the field without a word) ...
    lenient = [e for e in schema_errors(crd_schema, manifest) if "Additional properties" in e]
    assert lenient == []
    # ... the strict schema names it.
    errors = schema_errors(strict(crd_schema), manifest)
    assert any("Additional properties" in e and repr(misspelled) in e for e in errors), errors


# --- generated from config/serve.yaml --------------------------------------------------------


def test_committed_manifests_are_what_the_generator_makes() -> None:
    rendered = _load_generator().render_all(REPO_ROOT)
    assert set(rendered) == set(MANIFESTS.values())
    for path, text in rendered.items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(REPO_ROOT)} is stale: run .venv/bin/python scripts/gen_k8s.py"
        )


def diff_paths(a: Any, b: Any, path: str = "") -> set[str]:
    """Paths (a.b[0].c) where two parsed YAML documents differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        found: set[str] = set()
        for key in a.keys() | b.keys():
            where = f"{path}.{key}" if path else str(key)
            found |= diff_paths(a[key], b[key], where) if key in a and key in b else {where}
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return set().union(
            *(diff_paths(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True)))
        )
    return set() if a == b else {path}


@pytest.mark.parametrize("variant", sorted(MANIFESTS))
def test_serve_config_v2_is_serve_yaml_but_for_the_listed_differences(variant: str) -> None:
    local = yaml.safe_load((REPO_ROOT / "config" / "serve.yaml").read_text(encoding="utf-8"))
    k8s = serve_config_of(load_manifest(variant))
    unexpected = {
        path
        for path in diff_paths(local, k8s)
        if not any(re.fullmatch(pattern, path) for pattern in ALLOWED_DIFFERENCES)
    }
    assert unexpected == set(), f"serveConfigV2 differs from config/serve.yaml at {unexpected}"
    assert k8s["http_options"] == {"host": "0.0.0.0", "port": 8000}


@pytest.mark.parametrize("variant", sorted(MANIFESTS))
def test_serve_config_v2_args_validate_and_name_the_same_models(variant: str) -> None:
    config = app_config_of(load_manifest(variant))
    local = app_config_from_serve_config(REPO_ROOT / "config" / "serve.yaml")
    assert [m.id for m in config.models] == [m.id for m in local.models]
    assert config.cache_dir.startswith("/")  # an absolute path: the volume mounted there


@pytest.mark.parametrize("variant", sorted(MANIFESTS))
def test_serve_config_v2_has_one_application_per_model_and_the_ingress(variant: str) -> None:
    apps = serve_config_of(load_manifest(variant))["applications"]
    by_name = {app["name"]: app for app in apps}
    config = app_config_of(load_manifest(variant))
    assert set(by_name) == {"serve-app", *(m.id for m in config.models)}
    assert by_name["serve-app"]["route_prefix"] == "/"
    assert by_name["serve-app"]["import_path"] == "deployments.app:build_ingress_app"
    for model in config.models:
        assert by_name[model.id]["route_prefix"] is None  # reached through the ingress only
        assert by_name[model.id]["import_path"] == "deployments.app:build_model_app"
    # A replaced ingress or LLM replica drains its open streams (up to the request deadline).
    deadline = config.ingress.request_timeout_s or 0
    drains = [config.ingress.deployment] + [
        m.deployment for m in config.models if m.kind != "embedding"
    ]
    assert all((d.graceful_shutdown_timeout_s or 0) > deadline for d in drains)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic usage
@pytest.mark.parametrize("variant", sorted(MANIFESTS))
def test_serve_config_v2_is_what_ray_serve_and_its_runtime_env_accept(variant: str) -> None:
    from ray.runtime_env import RuntimeEnv
    from ray.serve.schema import ServeDeploySchema

    config = serve_config_of(load_manifest(variant))
    schema = ServeDeploySchema.model_validate(config)  # what KubeRay submits to the dashboard
    assert schema.http_options.host == "0.0.0.0"
    for app in config["applications"]:
        RuntimeEnv(**app["runtime_env"])  # raises on a field Ray does not know


@pytest.mark.parametrize("variant", sorted(MANIFESTS))
def test_the_cluster_installs_the_project_and_the_model_packages(variant: str) -> None:
    manifest = load_manifest(variant)
    apps = serve_config_of(manifest)["applications"]
    runtime_env = apps[0]["runtime_env"]
    assert all(app["runtime_env"] == runtime_env for app in apps)  # one env to install per node
    assert re.match(r"^(https|s3|gs)://.+\.zip$", runtime_env["working_dir"])
    packages = {re.split(r"[\[<>=!~;\s]", p, maxsplit=1)[0] for p in runtime_env["pip"]["packages"]}
    assert {"torch", "transformers", "gguf", "safetensors", "fastapi", "pydantic"} <= packages
    assert "ray" not in packages  # the image's Ray; a second one would not match the cluster
    models = (REPO_ROOT / "requirements-models.txt").read_text().split()
    models = [line for line in models if "==" in line]
    for group in cluster_of(manifest)["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        (init,) = spec["initContainers"]
        assert "--no-deps" in init["command"] and set(models) <= set(init["args"])
        target = init["args"][init["args"].index("--target") + 1]
        (container,) = spec["containers"]
        assert {"name": "PYTHONPATH", "value": target} in container["env"]


@pytest.mark.parametrize("variant", sorted(MANIFESTS))
def test_api_keys_come_from_an_optional_secret_on_every_ray_container(variant: str) -> None:
    cluster = cluster_of(load_manifest(variant))
    specs = [cluster["headGroupSpec"]["template"]["spec"]]
    specs += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for spec in specs:
        (container,) = spec["containers"]
        (keys,) = [e for e in container["env"] if e["name"] == "SERVE_APP_API_KEYS"]
        assert keys["valueFrom"]["secretKeyRef"]["optional"] is True  # no Secret: keys off


# --- placement: the head runs no work, the replicas fit the worker pods ----------------------


def _cpu_amount(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def worker_slots(manifest: dict[str, Any]) -> list[dict[str, float]]:
    slots = []
    for group in cluster_of(manifest)["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        pod = {"CPU": _cpu_amount(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
        slots += [dict(pod) for _ in range(group["replicas"])]
    return slots


def replica_demands(config: AppConfig) -> list[tuple[str, dict[str, float]]]:
    deployments = [("ingress", config.ingress.deployment)]
    deployments += [(m.id, m.deployment) for m in config.models]
    demands = []
    for name, deployment in deployments:
        options = deployment.ray_actor_options
        autoscaling = deployment.autoscaling_config or {}
        count = autoscaling.get("max_replicas") or deployment.num_replicas or 1
        need = {"CPU": float(options.get("num_cpus", 1)), "GPU": float(options.get("num_gpus", 0))}
        demands += [(name, need)] * int(count)
    return demands


@pytest.mark.parametrize("variant", sorted(MANIFESTS))
def test_every_replica_fits_on_the_worker_pods(variant: str) -> None:
    manifest = load_manifest(variant)
    assert cluster_of(manifest)["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    slots = worker_slots(manifest)
    demands = sorted(replica_demands(app_config_of(manifest)), key=lambda d: -sum(d[1].values()))
    for name, need in demands:  # first fit, largest first
        slot = next((s for s in slots if all(s[k] >= v for k, v in need.items())), None)
        assert slot is not None, f"{variant}: no worker pod left for a replica of {name} {need}"
        for key, amount in need.items():
            slot[key] -= amount


def test_gpu_variant_puts_the_llms_on_gpus() -> None:
    manifest = load_manifest("gpu")
    cluster = cluster_of(manifest)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [
        g
        for g in cluster["workerGroupSpecs"]
        if int(
            g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
        )
        >= 1
    ]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    for group in gpu_groups:  # a replica with num_gpus: 0 must not see (and use) the GPUs
        (container,) = group["template"]["spec"]["containers"]
        assert {"name": "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "value": "1"} in container["env"]
    for model in app_config_of(manifest).models:
        num_gpus = model.deployment.ray_actor_options.get("num_gpus", 0)
        if model.kind == "embedding" and EMBEDDING_MAY_USE_CPU:
            continue
        assert num_gpus >= 1, f"{model.id} asks no GPU in the GPU variant"


def test_cpu_variant_asks_no_gpu() -> None:
    manifest = load_manifest("cpu")
    for model in app_config_of(manifest).models:
        assert model.deployment.ray_actor_options.get("num_gpus", 0) == 0
    assert "nvidia.com/gpu" not in yaml.safe_dump(cluster_of(manifest))
