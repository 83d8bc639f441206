"""config/serve.yaml validation and model-source resolution (no Ray, no real models needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.config import AppConfig, ModelConfig, app_config_from_serve_config
from serve_app.model_store import ModelSourceError, prepare_weights, resolve_source

REPO_ROOT = Path(__file__).resolve().parents[2]


def model(source: str, **fields: object) -> ModelConfig:
    return ModelConfig(id="m", kind="chat", source=source, **fields)  # type: ignore[arg-type]


def test_bundled_config_declares_the_three_models() -> None:
    config = app_config_from_serve_config(REPO_ROOT / "config" / "serve.yaml")
    kinds = {m.id: m.kind for m in config.models}
    assert kinds == {
        "smollm2-135m-instruct": "chat",
        "gemma-3-270m": "completion",
        "all-minilm-l6-v2": "embedding",
    }
    for m in config.models:
        options = m.deployment.to_serve_options()
        assert {"ray_actor_options", "max_ongoing_requests", "autoscaling_config"} <= set(options)
        assert "num_replicas" not in options  # autoscaling and num_replicas exclude each other


def test_unknown_config_keys_and_duplicate_ids_are_errors() -> None:
    with pytest.raises(ValidationError, match="engin"):
        AppConfig.model_validate(
            {"models": [{"id": "a", "kind": "chat", "source": "x", "engin": {}}]}
        )
    with pytest.raises(ValidationError, match="duplicate"):
        AppConfig.model_validate({"models": [model("x").model_dump(), model("y").model_dump()]})


def test_missing_package_names_model_and_source(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match=r"'m'.*pkg://no_such_pkg_xyz/w.gguf|not installed"):
        resolve_source(model("pkg://no_such_pkg_xyz/w.gguf"), tmp_path)


def test_missing_local_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="no such file"):
        resolve_source(model(str(tmp_path / "absent")), tmp_path)


def test_hf_repo_offline_fails_with_model_and_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelSourceError) as info:
        resolve_source(model("hf://HuggingFaceTB/SmolLM2-135M-Instruct"), tmp_path)
    assert "'m'" in str(info.value) and "HuggingFaceTB/SmolLM2-135M-Instruct" in str(info.value)


def test_folder_sources(tiny_model_dir: Path, tmp_path: Path) -> None:
    weights = resolve_source(model(str(tiny_model_dir)), tmp_path)
    assert weights.directory == tiny_model_dir and weights.gguf_file is None
    assert prepare_weights(model(str(tiny_model_dir)), tmp_path) == tiny_model_dir
    (tmp_path / "only.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="only .gguf"):
        resolve_source(model(str(tmp_path / "only.bin")), tmp_path)


def test_device_follows_the_gpu_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from serve_app.config import EngineOptions
    from serve_app.loading import pick_device, pick_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node
    auto = EngineOptions(device="auto")
    assert pick_device(auto, has_gpu=False).type == "cpu"  # num_gpus=0 replica on a GPU node
    assert pick_device(auto, has_gpu=True).type == "cuda"
    assert pick_dtype(auto, torch.device("cuda")) == torch.bfloat16
    assert pick_dtype(auto, torch.device("cpu")) == torch.float32
    assert pick_device(EngineOptions(device="cpu"), has_gpu=True).type == "cpu"


@pytest.mark.parametrize(
    ("kind", "option"),
    [
        ("embedding", {"max_num_seqs": 8}),
        ("embedding", {"prefix_cache_tokens": 1024}),
        ("embedding", {"default_max_tokens": 64}),
        ("embedding", {"stream_interval": 2}),
        ("embedding", {"max_prefill_tokens": 512}),
        ("chat", {"max_batch_size": 8}),
        ("completion", {"max_batch_size": 8}),
    ],
)
def test_a_model_refuses_the_engine_options_of_the_other_kind(
    kind: str, option: dict[str, int]
) -> None:
    (name,) = option
    with pytest.raises(ValidationError, match=rf"model 'm' \({kind}\).*{name}.* only"):
        ModelConfig.model_validate({"id": "m", "kind": kind, "source": "x", "engine": option})


@pytest.mark.parametrize("other", [{"weights": "float32"}, {"quantization": "int8"}])
def test_fp16_copies_are_refused_without_native_weights(other: dict[str, str]) -> None:
    engine = {"fp16_copy_min_rows": 8, **other}
    with pytest.raises(ValidationError, match="fp16_copy_min_rows .* needs weights: native"):
        ModelConfig.model_validate({"id": "m", "kind": "chat", "source": "x", "engine": engine})
    native = {"id": "m", "kind": "chat", "source": "x", "engine": {"fp16_copy_min_rows": 8}}
    assert ModelConfig.model_validate(native).engine.fp16_copy_min_rows == 8


def test_engine_options_of_a_models_own_kind_survive_the_round_trip() -> None:
    embedding = ModelConfig.model_validate(
        {"id": "e", "kind": "embedding", "source": "x", "engine": {"max_batch_size": 8}}
    )
    llm = model("x", engine={"max_num_seqs": 4, "prefix_cache_tokens": 64})
    for config in (embedding, llm):
        dumped = config.model_dump(mode="json")  # what a replica is given
        assert ModelConfig.model_validate(dumped) == config
    assert "max_num_seqs" not in embedding.model_dump()["engine"]
    assert "max_batch_size" not in llm.model_dump()["engine"]


def test_pull_prepares_every_model_and_names_the_ones_that_fail(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`serve-app pull` runs the models' preparations in worker processes: each one ready is
    reported with its folder, a bad source is reported by name, and the exit status says so.
    The native layers' C library is compiled into the kernel cache too (where this machine can
    run it), so the engines that start next find it built."""
    import yaml

    from serve_app.cli import pull_models
    from serve_app.engine import q4_native

    kernels = tmp_path / "kernels"
    monkeypatch.setenv("SERVE_APP_KERNEL_DIR", str(kernels))
    # the workers fork from this process: none may inherit a library loaded from elsewhere
    q4_native.q4_kernel.cache_clear()

    serve_config = yaml.safe_load((REPO_ROOT / "config" / "serve.yaml").read_text())
    for app in serve_config["applications"]:
        if "model" in app["args"]:
            missing = app["args"]["model"]["id"] == "gemma-3-270m"
            source = tmp_path / "missing" if missing else tiny_model_dir
            app["args"]["model"]["source"] = str(source)
            app["args"]["cache_dir"] = str(tmp_path / "cache")
    config_path = tmp_path / "serve.yaml"
    config_path.write_text(yaml.safe_dump(serve_config))

    assert pull_models(str(config_path)) == 1
    out = capsys.readouterr().out
    assert "ready  smollm2-135m-instruct" in out
    assert "ready  all-minilm-l6-v2" in out
    assert out.count(f"-> {tiny_model_dir}") == 2
    assert "FAILED gemma-3-270m: model 'gemma-3-270m': cannot resolve source" in out
    built = sorted(kernels.glob("q4_kernel-*.so"))
    if q4_native._cpu_has("avx2", "fma", "f16c") and shutil.which("cc"):
        assert "ready  kernels" in out and len(built) == 1 and f"-> {built[0]}" in out
    else:
        assert "skip   kernels: no C kernels here" in out and not built


def test_a_chunked_package_is_assembled_under_a_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The package's assemble() writes its file in place: it runs holding the file's lock, so
    two processes preparing from one package never write it at once."""
    import fcntl
    import sys
    import types

    seen: list[bool] = []

    def assemble(output_path: Path) -> Path:
        lock = output_path.with_name(output_path.name + ".lock")
        with lock.open("a") as other:  # another process's attempt, as flock sees it
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append(False)
            except BlockingIOError:
                seen.append(True)
        output_path.write_bytes(b"GGUF")
        return output_path

    package = types.ModuleType("chunked_model_pkg")
    package.MODEL_NAME = "m.gguf"  # type: ignore[attr-defined]
    package.assemble = assemble  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "chunked_model_pkg", package)
    config = ModelConfig(id="m", kind="chat", source="pkg-assemble://chunked_model_pkg")
    weights = resolve_source(config, tmp_path)
    assert seen == [True]
    assert weights.directory == tmp_path / "assembled" and weights.gguf_file == "m.gguf"
