"""Replicas that start together and prepare the same GGUF: one converts, the others reuse its
folder, and nobody removes a finished folder another replica is loading."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import transformers

from serve_app import model_store
from serve_app.config import ModelConfig
from serve_app.model_store import prepare_weights

CONVERT_S = 0.5  # long enough for the second replica to arrive mid-conversion


class FakeConversion:
    """transformers' GGUF loading, faked: a model whose save_pretrained is slow and writes."""

    def __init__(self) -> None:
        self.num_loads = 0
        self._lock = threading.Lock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", self.tokenizer)
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", self.model)

    def tokenizer(self, *_: Any, **__: Any) -> Any:
        return SimpleNamespace(
            save_pretrained=lambda d: (Path(d) / "tokenizer.json").write_text("{}")
        )

    def model(self, *_: Any, **__: Any) -> Any:
        with self._lock:
            self.num_loads += 1

        def save(directory: str) -> None:
            time.sleep(CONVERT_S)
            (Path(directory) / "model.safetensors").write_bytes(b"weights")

        return SimpleNamespace(
            hf_quantizer=object(), config=SimpleNamespace(), save_pretrained=save
        )


def gguf_model(tmp_path: Path) -> ModelConfig:
    source = tmp_path / "weights" / "m.gguf"
    source.parent.mkdir()
    source.write_bytes(b"GGUF fake")
    # The conversion cache is the float32 path (native GGUF weights are not converted).
    return ModelConfig(id="m", kind="chat", source=str(source), engine={"weights": "float32"})


def test_two_replicas_preparing_at_once_share_one_conversion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeConversion()
    fake.install(monkeypatch)
    model, cache_dir = gguf_model(tmp_path), tmp_path / "cache"
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(prepare_weights, model, cache_dir)
        time.sleep(CONVERT_S / 5)  # the second arrives while the first converts
        second = pool.submit(prepare_weights, model, cache_dir)
        target = first.result()
        weights = target / "model.safetensors"
        loaded_by_first = weights.stat().st_ino  # the first replica now loads this file
        assert second.result() == target
    assert fake.num_loads == 1  # converted once, not once per replica
    assert weights.stat().st_ino == loaded_by_first  # the first's folder was not replaced
    assert sorted(p.name for p in target.iterdir()) == [
        "model.safetensors",
        "serve-app-complete.json",
        "tokenizer.json",
    ]
    assert [p.name for p in (cache_dir / "converted").iterdir() if p.is_dir()] == [target.name]


def test_an_incomplete_folder_is_replaced_and_a_complete_one_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeConversion()
    fake.install(monkeypatch)
    model, cache_dir = gguf_model(tmp_path), tmp_path / "cache"
    sha = model_store._sha256(Path(model.source))[:16]
    leftover = cache_dir / "converted" / f"m-{sha}"
    leftover.mkdir(parents=True)
    (leftover / "half-written.safetensors").write_bytes(b"")  # no completion marker
    target = prepare_weights(model, cache_dir)
    assert target == leftover and not (target / "half-written.safetensors").exists()
    staging = cache_dir / "converted" / "staging"
    staging.mkdir()
    model_store._publish(staging, target)  # a complete target is never swapped out
    assert staging.exists() and (target / "model.safetensors").exists()
    assert fake.num_loads == 1
