"""Native GGUF weights (weights: native) against the float32 path, as llama.cpp measures
quantization: over a fixed text (benchmarks/data/quality_text.txt, >= 2,000 tokens: the
Apache-2.0 text and the history part of Python's LICENSE), teacher-forced in windows of 512
tokens, the mean KL divergence of the native model's next-token distribution to the float32
model's and how often their top-1 tokens agree, once per path of the int4 layers (the int4
kernel, as decode steps run; their weights unpacked to float32, as big prefill forwards run;
fp16 copies, as forwards from fp16_copy_min_rows rows run);
the Paris answer; the largest difference between each repacked weight and the GGUF's
dequantized values, per GGUF type; decode-step time at batch 1 and 16, native and float32
interleaved (A B A B, median of rounds); resident memory after warm-up, each form in a fresh
process. Prints the figures; writes JSON.

    flock /tmp/serve-app-bench.lock .venv/bin/python benchmarks/quant_quality.py \\
        --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from serve_app.config import ModelConfig, app_config_from_serve_config
from serve_app.engine import quantized_linear
from serve_app.engine.batch import cache_kv, growing_cache
from serve_app.engine.gguf_weights import dequantized, read_tensors
from serve_app.engine.quantized_linear import (
    Bf16Embedding,
    Bf16Linear,
    Fp16Linear,
    Int4Linear,
    Q8Embedding,
    add_fp16_copies,
)
from serve_app.loading import load_model
from serve_app.model_store import prepare_weights

TEXT = Path(__file__).parent / "data" / "quality_text.txt"
WINDOW = 512
KL_LIMIT, TOP1_LIMIT = 0.005, 0.97
# quantized_linear.(Q4_)DEQUANTIZED_MIN_ROWS for each path an int4 layer can take
INT4_PATHS = {"int4 kernel": 1 << 30, "float32 unpacked": 0}
FP16_COPY = "fp16 copy"


def model_config(config_path: str, model_id: str, weights: str) -> tuple[ModelConfig, Path]:
    config = app_config_from_serve_config(config_path)
    model = next(m for m in config.models if m.id == model_id)
    # Without fp16 copies: each int4 path is measured as named, the copies on their own.
    engine = model.engine.model_copy(update={"weights": weights, "fp16_copy_min_rows": None})
    return model.model_copy(update={"engine": engine}), Path(config.cache_dir).expanduser()


def load(config_path: str, model_id: str, weights: str) -> tuple[Any, Any]:
    model, cache_dir = model_config(config_path, model_id, weights)
    loaded, tokenizer, _ = load_model(model, cache_dir, AutoModelForCausalLM, has_gpu=False)
    return loaded, tokenizer


@torch.no_grad()
def teacher_forced(reference: Any, native: Any, ids: list[int]) -> dict[str, float]:
    """Mean KL(reference || native) per position and top-1 agreement, windows of WINDOW."""
    kls, agree, count = [], 0, 0
    for start in range(0, len(ids) - 1, WINDOW):
        window = torch.tensor([ids[start : start + WINDOW]])
        p = torch.log_softmax(reference(input_ids=window).logits[0].double(), dim=-1)
        q = torch.log_softmax(native(input_ids=window).logits[0].double(), dim=-1)
        kls.append((p.exp() * (p - q)).sum(dim=-1))
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        count += window.shape[1]
    kl = torch.cat(kls)
    return {
        "num_tokens": count,
        "mean_kl": float(kl.mean()),
        "p99_kl": float(kl.quantile(0.99)),
        "max_kl": float(kl.max()),
        "top1_agreement": agree / count,
    }


@contextlib.contextmanager
def int4_path(path: str) -> Iterator[None]:
    """Every int4 layer takes `path` (a key of INT4_PATHS) until the block ends."""
    names = ("DEQUANTIZED_MIN_ROWS", "Q4_DEQUANTIZED_MIN_ROWS")  # torch's kernel, q4_kernel.c
    shipped = [getattr(quantized_linear, name) for name in names]
    for name in names:
        setattr(quantized_linear, name, INT4_PATHS[path])
    try:
        yield
    finally:
        for name, value in zip(names, shipped, strict=True):
            setattr(quantized_linear, name, value)


@contextlib.contextmanager
def fp16_copies(model: Any) -> Iterator[None]:
    """Every int4 layer multiplies by an fp16 copy of its weight until the block ends."""
    add_fp16_copies(model, min_rows=1)
    try:
        yield
    finally:
        for module in model.modules():
            if isinstance(module, Int4Linear):
                module.fp16_parts = []


def quality_per_int4_path(reference: Any, native: Any, ids: list[int]) -> dict[str, Any]:
    """teacher_forced once with every int4 layer on each path (windows of 512 tokens would
    otherwise take only the float32 one, and decode steps run the kernel), and once more on
    fp16 copies (fp16_copy_min_rows)."""
    found = {}
    for path in INT4_PATHS:
        with int4_path(path):
            found[path] = teacher_forced(reference, native, ids)
    with fp16_copies(native):
        found[FP16_COPY] = teacher_forced(reference, native, ids)
    return found


QUESTION = "What is the capital of France?"


def paris_prompt_ids(tokenizer: Any) -> torch.Tensor:
    """The question as the service sends it: through the chat template where the model has one
    (session 14: a bf16 head broke SmolLM2's chat answer while its raw-text answer held), as
    "Q: ...\nA:" text for a base model (Gemma-3-270m continues "The capital of France is"
    without naming Paris, in float32 too)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": QUESTION}]
        encoded = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return torch.tensor([list(encoded["input_ids"])])
    return tokenizer(f"Q: {QUESTION}\nA:", return_tensors="pt").input_ids


@torch.no_grad()
def greedy(model: Any, tokenizer: Any, num_tokens: int = 8) -> str:
    ids = paris_prompt_ids(tokenizer)
    for _ in range(num_tokens):
        next_id = model(input_ids=ids).logits[0, -1].argmax().view(1, 1)
        ids = torch.cat([ids, next_id], dim=1)
    return str(tokenizer.decode(ids[0, -num_tokens:]))


def weight_differences(model: Any, directory: Path) -> dict[str, dict[str, float]]:
    """Per (GGUF type -> form): the largest |repacked - GGUF dequantized| over all its tensors,
    and that relative to the tensor's largest |value|. A tied head is compared with the
    vocabulary tensor it shares."""
    from accelerate import init_empty_weights

    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    head_name = next(n for n, m in modules.items() if m is head)
    with init_empty_weights(include_buffers=False):  # the plain layers' names, for the index
        skeleton = AutoModelForCausalLM.from_config(model.config)
    found: dict[str, dict[str, float]] = {}
    tensors = read_tensors(directory, skeleton)
    for name, (qtype, raw) in tensors.items():
        module = modules.get(name.removesuffix(".weight"))
        if not isinstance(module, (Int4Linear, Bf16Linear, Fp16Linear, Q8Embedding, Bf16Embedding)):
            continue
        reference = dequantized(raw, qtype)
        compared = [(module, type(module).__name__)]
        if module is model.get_input_embeddings() and f"{head_name}.weight" not in tensors:
            compared.append((head, f"{type(head).__name__} tied head"))
        for layer, form in compared:
            diff = float((layer.dequantized() - reference).abs().max())
            entry = found.setdefault(
                f"{qtype.name}->{form}", {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "tensors": 0}
            )
            entry["max_abs_diff"] = max(entry["max_abs_diff"], diff)
            entry["max_rel_diff"] = max(entry["max_rel_diff"], diff / float(reference.abs().max()))
            entry["tensors"] += 1
    return found


@torch.no_grad()
def step_ms(model: Any, batch: int, context: int = 64, steps: int = 16) -> float:
    """ms per greedy decode step of `batch` rows after a `context`-token prefill."""
    ids = torch.randint(100, 10_000, (batch, context), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, context, dtype=torch.long)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
    cache = growing_cache(cache_kv(cache))  # written in place, as the engine does
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for step in range(steps + 2):  # 2 warm-up steps
        if step == 2:
            started = time.perf_counter()
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        position = torch.full((batch, 1), mask.shape[1] - 1)
        out = model(
            input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache
        )
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - started) / steps * 1e3


def interleaved_steps(models: dict[str, Any], batches: list[int], rounds: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for batch in batches:
            for name, model in models.items():  # A B A B: the machine's drift hits both
                times.setdefault(f"{name} b{batch}", []).append(step_ms(model, batch))
    result: dict[str, Any] = {k: statistics.median(v) for k, v in times.items()}
    for batch in batches:
        ms_native, ms_float = result[f"native b{batch}"], result[f"float32 b{batch}"]
        result[f"speedup b{batch}"] = ms_float / ms_native
        result[f"tok_s native b{batch}"] = batch * 1e3 / ms_native
        result[f"tok_s float32 b{batch}"] = batch * 1e3 / ms_float
    result["rounds"] = rounds
    return result


def resident_mb(config_path: str, model_id: str, weights: str) -> float:
    """VmRSS of a fresh process that loaded the model and ran a warm-up prefill + decode."""
    code = (
        "import sys, torch; torch.set_num_threads(2);"
        "from benchmarks.quant_quality import load, step_ms;"
        f"m, _ = load({config_path!r}, {model_id!r}, {weights!r}); step_ms(m, 4);"
        "import gc; gc.collect();"
        "from serve_app.engine.model_runner import release_free_memory; release_free_memory();"
        "print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/serve.yaml")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)

    started = time.perf_counter()
    native, tokenizer = load(args.config, args.model, "native")
    native_load_s = time.perf_counter() - started
    reference, _ = load(args.config, args.model, "float32")
    config, cache_dir = model_config(args.config, args.model, "native")
    directory = prepare_weights(config, cache_dir)

    ids = tokenizer(TEXT.read_text()).input_ids
    results: dict[str, Any] = {"model": args.model, "text_tokens": len(ids)}
    results["native_load_s"] = native_load_s
    results["weights"] = weight_differences(native, directory)
    results["quality"] = quality_per_int4_path(reference, native, ids)
    results["paris"] = {
        "native": greedy(native, tokenizer),
        "float32": greedy(reference, tokenizer),
    }
    with fp16_copies(native):
        results["paris"][f"native, {FP16_COPY}"] = greedy(native, tokenizer)
    results["passes"] = bool(
        len(ids) >= 2000
        and all(
            quality["mean_kl"] <= KL_LIMIT and quality["top1_agreement"] >= TOP1_LIMIT
            for quality in results["quality"].values()
        )
        and all("Paris" in answer for answer in results["paris"].values())
    )
    print(json.dumps(results, indent=2), flush=True)
    if not args.skip_speed:
        models = {"native": native, "float32": reference}
        results["decode_step"] = interleaved_steps(models, args.batches, args.rounds)
        print(json.dumps(results["decode_step"], indent=2), flush=True)
    del native, reference
    results["resident_mb"] = {
        w: resident_mb(args.config, args.model, w) for w in ("native", "float32")
    }
    print(json.dumps(results["resident_mb"], indent=2))
    out = Path(args.out or f"results/quant_quality-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}; passes the quality guard: {results['passes']}")


if __name__ == "__main__":
    main()
