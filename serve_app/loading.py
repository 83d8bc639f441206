"""Loads prepared weights onto the replica's device and builds the engine for a model."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

from serve_app.config import EngineOptions, ModelConfig
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.engine.gguf_weights import load_native_model
from serve_app.engine.inference_thread import InferenceThread
from serve_app.engine.llm_engine import LLMEngine
from serve_app.engine.packed_linear import can_pack, pack_linear_layers
from serve_app.engine.q4_native import set_threads
from serve_app.engine.quantized_linear import add_fp16_copies
from serve_app.model_store import is_native_folder, prepare_weights

logger = logging.getLogger(__name__)
T = TypeVar("T")

_DEFAULT_CONTEXT = 2048


def pick_device(options: EngineOptions, has_gpu: bool = True) -> torch.device:
    """has_gpu: whether the replica was given one (Ray shows every GPU even to num_gpus=0)."""
    if options.device == "cuda":
        return torch.device("cuda")
    if options.device == "auto" and has_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(options: EngineOptions, device: torch.device) -> torch.dtype:
    if options.dtype != "auto":
        return getattr(torch, options.dtype)
    # No native bf16 on these CPUs (bf16 matmul measured ~300x slower than fp32).
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def configure_threads(options: EngineOptions) -> None:
    if options.torch_threads:
        set_threads(options.torch_threads)


# Told the weights folder and the tokenizer's class before the tokenizer loads (or, where the
# folder does not name its class, once it has): the engine process sends them to its replica,
# which loads its own tokenizer meanwhile (engine_client.py).
TokenizerHook = Callable[[Path, type[Any]], None]


def saved_tokenizer_class(directory: Path) -> type[Any] | None:
    """The tokenizer class the folder's tokenizer_config.json names, as AutoTokenizer resolves
    that name (transformers' tokenizer_class_from_name), or None where it names none."""
    try:
        name = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None
    return tokenizer_class_from_name(name) if isinstance(name, str) else None


def load_tokenizer(directory: Path, on_tokenizer: TokenizerHook | None = None) -> Any:
    """The folder's tokenizer. `on_tokenizer` hears its class before it loads when the folder
    names it (the replica's copy then loads beside this one: Gemma-3's takes ~3 s each)."""
    tokenizer_class = saved_tokenizer_class(directory)
    if tokenizer_class is None:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if on_tokenizer is not None:
            on_tokenizer(directory, type(tokenizer))
        return tokenizer
    if on_tokenizer is not None:
        on_tokenizer(directory, tokenizer_class)
    return tokenizer_class.from_pretrained(directory)


def load_model(
    model_config: ModelConfig,
    cache_dir: Path,
    auto_class: Any,
    has_gpu: bool,
    on_tokenizer: TokenizerHook | None = None,
) -> tuple[Any, Any, torch.device]:
    """Prepared weights -> (model in eval mode on its device, tokenizer, device)."""
    options = model_config.engine
    configure_threads(options)
    directory = prepare_weights(model_config, cache_dir)
    device = pick_device(options, has_gpu)
    if is_native_folder(directory) and device.type != "cpu":  # native weights are CPU kernels
        directory = prepare_weights(model_config, cache_dir, native=False)
    tokenizer = load_tokenizer(directory, on_tokenizer)
    if is_native_folder(directory):
        model, report = load_native_model(directory, auto_class)
        logger.info("native GGUF weights: %s", report.forms)
        if options.fp16_copy_min_rows is not None:
            num_weights = add_fp16_copies(model, options.fp16_copy_min_rows)
            logger.info(
                "fp16 copies of %d 4-bit weights, used from %d rows on",
                num_weights,
                options.fp16_copy_min_rows,
            )
        return model, tokenizer, device
    model = auto_class.from_pretrained(
        directory,
        dtype=pick_dtype(options, device),
        use_safetensors=True,
        trust_remote_code=model_config.trust_remote_code,
    )
    model = model.to(device).eval()
    if options.prepack_linear and options.quantization == "none" and can_pack(model):
        pack_linear_layers(model, directory)
    return model, tokenizer, device


def in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """Runs fn in a thread that exits when it returns (the embedding engine's load: its forward
    passes run in Serve's worker threads). An LLM engine loads on its inference thread instead
    (serve_app/engine/inference_thread.py): with torch 2.13 a team left by an exited loading
    thread still slowed the inference thread's steps 1.6-2x.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load") as pool:
        return pool.submit(fn, *args).result()


def build_llm_engine(
    model_config: ModelConfig,
    cache_dir: Path,
    has_gpu: bool = True,
    on_tokenizer: TokenizerHook | None = None,
) -> LLMEngine:
    """Loads the model and builds the engine on the thread that will run its steps (the one
    OpenMP team of the process: serve_app/engine/inference_thread.py), then starts it."""
    options = model_config.engine
    thread = InferenceThread()

    def build() -> LLMEngine:
        model, tokenizer, device = load_model(
            model_config, cache_dir, AutoModelForCausalLM, has_gpu, on_tokenizer
        )
        model = quantize(model, options, device)
        return LLMEngine(
            model,
            tokenizer,
            max_num_seqs=options.max_num_seqs,
            max_model_len=context_length(model.config, options),
            eos_token_ids=eos_token_ids(model, tokenizer),
            max_prefill_tokens=options.max_prefill_tokens,
            max_prefill_rows=options.max_prefill_rows,
            stream_interval=options.stream_interval,
            prefix_cache_tokens=options.prefix_cache_tokens,
            thread=thread,
        )

    try:
        engine = thread.call(build)
    except BaseException:
        thread.stop()
        raise
    engine.start()
    engine.grammars.start_warming()
    return engine


def build_embedding_engine(
    model_config: ModelConfig, cache_dir: Path, has_gpu: bool = True
) -> EmbeddingEngine:
    options = model_config.engine
    model, tokenizer, _ = in_own_thread(load_model, model_config, cache_dir, AutoModel, has_gpu)
    return EmbeddingEngine(
        model,
        tokenizer,
        max_model_len=context_length(model.config, options),
        max_batch_size=options.max_batch_size,
    )


def quantize(model: Any, options: EngineOptions, device: torch.device) -> Any:
    """Dynamic int8 Linear layers: weights read 4x less memory per decode step on CPU."""
    if options.quantization == "none":
        return model
    if device.type != "cpu":
        raise ValueError("quantization 'int8' is CPU-only; use dtype bfloat16 on GPU instead")
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def context_length(config: Any, options: EngineOptions) -> int:
    native = getattr(config, "max_position_embeddings", None) or _DEFAULT_CONTEXT
    return min(native, options.max_model_len) if options.max_model_len else int(native)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids
