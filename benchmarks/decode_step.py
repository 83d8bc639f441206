"""One decode step of SmolLM2, per batch size and dtype, three ways: transformers'
DynamicLayer (concatenates the whole cache every step), the KV cache written in place
(GrowingLayer), and in place plus Linear weights prepacked for oneDNN (PackedLinear, float32);
the packed variant once more in a second thread, the way a replica would run it if the thread
that loaded the model still held its OpenMP team (serve_app/loading.py, `in_own_thread`).

Same process, same random prompt ids (greedy), one variant right after the other; prints ms per
step and whether each produced the same tokens as the first; writes JSON.

    .venv/bin/python benchmarks/decode_step.py --batch-sizes 1 16 32 --dtypes float32 float16
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from serve_app.config import app_config_from_serve_config
from serve_app.engine.batch import GrowingLayer
from serve_app.engine.packed_linear import can_pack, pack_linear_layers
from serve_app.model_store import prepare_weights


def time_decode(
    model: Any, batch: int, context: int, steps: int, in_place: bool
) -> tuple[float, torch.Tensor]:
    """Prefills `context` random tokens per row, then times `steps` greedy decode steps."""
    ids = torch.randint(100, 10_000, (batch, context), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, context, dtype=torch.long)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
    if in_place:
        cache.layers = [GrowingLayer(layer.keys, layer.values) for layer in cache.layers]
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = []
    for step in range(steps + 3):  # 3 warm-up steps
        if step == 3:
            started = time.perf_counter()
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        position = torch.full((batch, 1), mask.shape[1] - 1)
        out = model(
            input_ids=token, attention_mask=mask, position_ids=position, past_key_values=cache
        )
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    return (time.perf_counter() - started) / steps * 1e3, torch.cat(tokens, dim=1)


def in_second_thread(fn: Callable[[], tuple[float, torch.Tensor]]) -> tuple[float, torch.Tensor]:
    """fn's result, computed in a new thread while this (loading) thread keeps its team."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/decode_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    config = app_config_from_serve_config("config/serve.yaml")
    model_config = config.model(args.model)
    if model_config is None:
        parser.error(f"no model {args.model} in config/serve.yaml")
    directory = prepare_weights(model_config, Path(config.cache_dir))
    rows = []
    for dtype in args.dtypes:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).eval()
        packed = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
        if can_pack(packed):
            pack_linear_layers(packed.eval(), directory)
        else:
            packed = None
        for batch in args.batch_sizes:
            concat_ms, concat_tokens = time_decode(model, batch, args.context, args.steps, False)
            in_place_ms, in_place_tokens = time_decode(model, batch, args.context, args.steps, True)
            row: dict[str, Any] = {
                "dtype": dtype,
                "batch": batch,
                "concat_ms": concat_ms,
                "in_place_ms": in_place_ms,
                "same_tokens": torch.equal(concat_tokens, in_place_tokens),
            }
            line = f"{dtype:8} batch {batch:3}: concat {concat_ms:7.1f} ms"
            line += f"  in place {in_place_ms:7.1f}"
            if packed is not None:
                packed_ms, packed_tokens = time_decode(
                    packed, batch, args.context, args.steps, True
                )
                row.update(
                    packed_ms=packed_ms,
                    packed_same_tokens=torch.equal(concat_tokens, packed_tokens),
                )
                same = row["packed_same_tokens"]
                line += f"  in place + packed {packed_ms:7.1f} (same tokens {same})"
                second_ms, _ = in_second_thread(
                    functools.partial(time_decode, packed, batch, args.context, args.steps, True)
                )
                row["packed_second_thread_ms"] = second_ms
                line += f"  same, 2nd OpenMP team {second_ms:7.1f}"
            rows.append(row)
            print(f"{line}  in place same tokens {row['same_tokens']}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
