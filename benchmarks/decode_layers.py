"""The written-out Llama step's layers in C (decode_kernel.c) against the same step in torch ops,
interleaved in one process: decode steps per row count, and a prompt's rest after a cached
prefix (prefill) against transformers' forward. SmolLM2 on native weights as the replica loads
it (config/serve.yaml's options, fp16 copies included); the same prompt and cache per variant.

Prints ms per step and per prefill (median of rounds, each round A then B) and the ratio;
writes JSON.

    flock /tmp/serve-app-bench.lock .venv/bin/python benchmarks/decode_layers.py --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from serve_app.config import app_config_from_serve_config
from serve_app.engine.batch import cache_kv, growing_cache
from serve_app.engine.model_runner import ModelRunner
from serve_app.loading import load_model, quantize


def load(config_path: str, model_id: str) -> Any:
    config = app_config_from_serve_config(config_path)
    model_config = next(m for m in config.models if m.id == model_id)
    cache_dir = Path(config.cache_dir).expanduser()
    model, _, device = load_model(model_config, cache_dir, AutoModelForCausalLM, has_gpu=False)
    return quantize(model, model_config.engine, device)


def prompt_cache(model: Any, rows: int, length: int) -> tuple[torch.Tensor, list[Any]]:
    """Random prompts [rows, length] and their keys/values from the model's own forward."""
    ids = torch.randint(100, 10_000, (rows, length), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return ids, cache_kv(cache)


def decode_ms(step: Any, kv: list[Any], rows: int, length: int, steps: int) -> float:
    """Median ms of `steps` decode steps after the cached prompt (a fresh copy of it)."""
    cache, mask = growing_cache(kv), torch.ones(rows, length, dtype=torch.long)
    tokens = torch.full((rows, 1), 42)
    times = []
    for offset in range(steps):
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        started = time.perf_counter()
        logits = step(tokens, torch.full((rows, 1), length + offset), mask, cache)
        times.append(time.perf_counter() - started)
        tokens = logits.argmax(-1, keepdim=True)
    return statistics.median(times) * 1e3


def c_prefill(step: Any, ids: Any, positions: Any, mask: Any, cache: Any) -> Any:
    return step.prefill(ids, positions, mask, cache)


@torch.no_grad()
def model_prefill(model: Any, ids: Any, positions: Any, mask: Any, cache: Any) -> Any:
    return model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )


def prefill_ms(prefill: Callable[[Any], Any], kv: list[Any], repeats: int = 5) -> float:
    """Median ms of a prefill after the cached prompt (a fresh copy of it each time)."""
    times = []
    for _ in range(repeats):
        cache = growing_cache(kv)
        started = time.perf_counter()
        prefill(cache)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/serve.yaml")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--context", type=int, default=40)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/decode_layers.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.config, args.model)
    in_c, in_torch = ModelRunner(model).llama_decode, ModelRunner(model).llama_decode
    if in_c is None or in_torch is None or not in_c.in_c:
        raise SystemExit("needs a Llama model on native weights and the C kernels built here")
    in_torch.in_c = False
    results: dict[str, dict[str, list[float]]] = {}

    def record(name: str, variant: str, value: float) -> None:
        results.setdefault(name, {}).setdefault(variant, []).append(value)

    decode_kv = {rows: prompt_cache(model, rows, args.context)[1] for rows in args.rows}
    ids, kv = prompt_cache(model, 1, args.context + max(args.prefill_tokens))
    prefix_kv = [(k[:, :, : args.context], v[:, :, : args.context]) for k, v in kv]
    for _ in range(args.rounds):
        for rows in args.rows:
            for variant, step in (("C", in_c), ("torch", in_torch)):
                ms = decode_ms(step, decode_kv[rows], rows, args.context, args.steps)
                record(f"decode step, {rows} rows", variant, ms)
        for tokens in args.prefill_tokens:
            rest = ids[:, args.context : args.context + tokens]
            positions = torch.arange(args.context, args.context + tokens).unsqueeze(0)
            mask = torch.ones(1, args.context + tokens, dtype=torch.long)

            inputs = (rest, positions, mask)
            name = f"prefill of {tokens} tokens after {args.context} cached"
            record(name, "C", prefill_ms(functools.partial(c_prefill, in_c, *inputs), prefix_kv))
            record(
                name,
                "torch",
                prefill_ms(functools.partial(model_prefill, model, *inputs), prefix_kv),
            )
    summary = {}
    print(f"{'':45} {'C ms':>8} {'torch ms':>9} {'torch/C':>8}")
    for name, variants in results.items():
        c_ms, torch_ms = (statistics.median(variants[v]) for v in ("C", "torch"))
        ratios = [t / c for c, t in zip(variants["C"], variants["torch"], strict=True)]
        summary[name] = {"C_ms": c_ms, "torch_ms": torch_ms, "ratio": statistics.median(ratios)}
        print(f"{name:45} {c_ms:8.2f} {torch_ms:9.2f} {summary[name]['ratio']:8.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"args": vars(args), "rounds": results, "summary": summary}, indent=1)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
