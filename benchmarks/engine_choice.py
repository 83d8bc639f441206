"""Why serve-app has its own scheduler: transformers' continuous batching vs ours, same model.

Runs both offline (no HTTP) on SmolLM2-135M-Instruct, greedy, on the same prompts, side by
side in one process, and prints aggregate output tokens/s for each batch size plus the ratio.

    .venv/bin/python benchmarks/engine_choice.py --batch-sizes 1 16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from serve_app.config import app_config_from_serve_config
from serve_app.engine.llm_engine import LLMEngine
from serve_app.engine.types import SamplingParams
from serve_app.loading import eos_token_ids
from serve_app.model_store import prepare_weights

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in two sentences.",
    "Give me three tips for learning Python.",
]


def load(model_id: str) -> tuple[object, object]:
    config = app_config_from_serve_config("config/serve.yaml")
    model_config = config.model(model_id)
    assert model_config is not None
    directory = prepare_weights(model_config, Path(config.cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, tokenizer


def prompts(tokenizer: object, count: int) -> list[list[int]]:
    out = []
    for i in range(count):
        messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        encoded = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        out.append(list(encoded["input_ids"]))
    return out


def run_ours(model: object, tokenizer: object, batch: list[list[int]], max_tokens: int) -> float:
    engine = LLMEngine(
        model,
        tokenizer,
        max_num_seqs=len(batch),
        max_model_len=8192,
        eos_token_ids=eos_token_ids(model, tokenizer),
    )
    engine.start()

    async def one(i: int, ids: list[int]) -> int:
        num_tokens = 0
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        async for output in engine.generate(str(i), ids, params):
            num_tokens = output.num_generated_tokens
        return num_tokens

    async def all_of_them() -> int:
        return sum(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(batch))))

    started = time.perf_counter()
    num_tokens = asyncio.run(all_of_them())
    elapsed = time.perf_counter() - started
    engine.shutdown()
    return num_tokens / elapsed


def run_transformers_cb(
    model: object, tokenizer: object, batch: list[list[int]], max_tokens: int
) -> float:
    config = GenerationConfig(
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
    )
    started = time.perf_counter()
    results = model.generate_batch(inputs=batch, generation_config=config, warmup=False)  # type: ignore[attr-defined]
    elapsed = time.perf_counter() - started
    num_tokens = sum(len(r.generated_tokens) for r in results.values())
    return num_tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/engine_choice.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load("smollm2-135m-instruct")
    rows = []
    run_ours(model, tokenizer, prompts(tokenizer, 1), 8)  # warm-up
    for size in args.batch_sizes:
        batch = prompts(tokenizer, size)
        ours = run_ours(model, tokenizer, batch, args.max_tokens)
        theirs = run_transformers_cb(model, tokenizer, batch, args.max_tokens)
        rows.append(
            {
                "batch": size,
                "ours_tok_s": ours,
                "transformers_cb_tok_s": theirs,
                "ratio": ours / theirs,
            }
        )
        print(
            f"batch {size:3d}: ours {ours:7.1f} tok/s   transformers CB {theirs:7.1f} tok/s"
            f"   ratio {ours / theirs:.2f}x",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
