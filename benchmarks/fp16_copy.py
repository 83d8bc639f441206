"""fp16 copies of the 4-bit weights (engine option fp16_copy_min_rows) against the int4 kernel,
in the written-out decode step the engine runs (LlamaDecodeStep, KV cache written in place):
ms per step at each batch size and thread count, one model loaded once and run both ways,
interleaved (int4, fp16, int4, fp16, ... per round; median of rounds); the prefill of one
prompt both ways; what the copies add to resident memory. Prints the figures; writes JSON.

    flock /tmp/serve-app-bench.lock .venv/bin/python benchmarks/fp16_copy.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from serve_app.engine.batch import cache_kv, growing_cache
from serve_app.engine.gguf_weights import load_native_model
from serve_app.engine.llama_decode import LlamaDecodeStep
from serve_app.engine.quantized_linear import Int4Linear, add_fp16_copies
from serve_app.model_store import prepare_weights


def resident_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


class Forms:
    """Switches every Int4Linear (the model's and the step's fused ones) between its fp16
    copies, used at any row count, and the int4 kernel alone (copies set aside)."""

    def __init__(self, model: Any, step: LlamaDecodeStep) -> None:
        layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
        layers += [f for layer in step.layers for f in (layer.qkv, layer.gate_up)]
        self.copies = {id(m): (m, m.fp16_parts) for m in layers if isinstance(m, Int4Linear)}

    def use(self, form: str) -> None:
        for layer, parts in self.copies.values():
            layer.fp16_parts = parts if form == "fp16" else []
            layer.fp16_min_rows = 1


@torch.no_grad()
def step_ms(model: Any, step: LlamaDecodeStep, rows: int, context: int, steps: int) -> float:
    ids = torch.randint(100, 10_000, (rows, context), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    cache = growing_cache(cache_kv(cache))
    token = torch.full((rows, 1), 1234)
    mask = torch.ones(rows, context + steps + 2, dtype=torch.long)
    times = []
    for i in range(steps + 2):
        positions = torch.full((rows, 1), context + i)
        started = time.perf_counter()
        logits = step(token, positions, mask[:, : context + i + 1], cache)
        times.append(time.perf_counter() - started)
        token = logits.argmax(-1, keepdim=True)
    return statistics.median(times[2:]) * 1e3


@torch.no_grad()
def prefill_ms(model: Any, tokens: int) -> float:
    ids = torch.randint(100, 10_000, (1, tokens), generator=torch.Generator().manual_seed(1))
    started = time.perf_counter()
    model(input_ids=ids, past_key_values=DynamicCache(), logits_to_keep=1)
    return (time.perf_counter() - started) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--config", default="config/serve.yaml")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 6, 8, 16, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[64, 256, 688])
    parser.add_argument("--context", type=int, default=100)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", default="results/fp16_copy.json")
    args = parser.parse_args()

    from serve_app.config import app_config_from_serve_config

    config = app_config_from_serve_config(args.config)
    model_config = next(m for m in config.models if m.id == args.model)
    folder = prepare_weights(model_config, Path(config.cache_dir).expanduser())
    model, _ = load_native_model(folder, AutoModelForCausalLM)
    before = resident_mb()
    num_weights = add_fp16_copies(model, 1)
    memory = {"copied_weights": num_weights, "added_mb": round(resident_mb() - before, 1)}
    print(f"fp16 copies of {num_weights} weights: +{memory['added_mb']} MB resident", flush=True)
    step = LlamaDecodeStep(model)
    forms = Forms(model, step)

    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for rows in args.rows:
                for form in ("int4", "fp16"):
                    forms.use(form)
                    ms = step_ms(model, step, rows, args.context, args.steps)
                    times.setdefault(f"step t{threads} b{rows} {form}", []).append(ms)
            for tokens in args.prefill_tokens:
                for form in ("int4", "fp16"):  # int4: the kernel, or float32 unpacked from 192
                    forms.use(form)
                    ms = prefill_ms(model, tokens)
                    times.setdefault(f"prefill t{threads} {tokens} {form}", []).append(ms)
    medians = {key: statistics.median(values) for key, values in times.items()}
    rows_out = []
    for key in medians:
        if key.endswith(" int4"):
            what = key.removesuffix(" int4")
            int4, fp16 = medians[key], medians[f"{what} fp16"]
            ratios = [a / b for a, b in zip(times[key], times[f"{what} fp16"], strict=True)]
            row = {"what": what, "int4_ms": round(int4, 2), "fp16_ms": round(fp16, 2)}
            row["int4_over_fp16"] = round(statistics.median(ratios), 3)
            rows_out.append(row)
            print(
                f"{what:24} int4 {int4:8.2f} ms  fp16 {fp16:8.2f} ms  int4/fp16 "
                f"{row['int4_over_fp16']:.2f}",
                flush=True,
            )
    result = {"model": args.model, "rounds": args.rounds, "memory": memory, "rows": rows_out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
