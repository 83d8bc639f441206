"""Prefix caching on and off, side by side: time to first token of SmolLM2's engine (built as a
replica builds it, in this process, no HTTP) on two workloads a cache is for.

1. shared system prompt: a long system prompt (~`--system-tokens`) with different short
   questions, sent one after another, then all at once;
2. a chat: each turn resends the whole conversation so far (the engine's own answers included).

The engine is built once per arm and arms alternate (`--rounds`), so the machine's drift hits
both. Prints TTFT per workload and arm, checks both arms gave the same greedy text, writes JSON.

    .venv/bin/python benchmarks/prefix_cache.py --rounds 2 --out results/prefix_cache.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from serve_app.config import ModelConfig, app_config_from_serve_config
from serve_app.engine.llm_engine import LLMEngine
from serve_app.engine.types import SamplingParams

MODEL_ID = "smollm2-135m-instruct"
POLICY = (
    "Policy {n}: when a customer asks about order {n}, check the shipping status, the payment "
    "state and the return window before answering, and answer politely in two sentences."
)
QUESTIONS = [
    "Where is my order?",
    "Can I return a pair of shoes?",
    "How do I change my address?",
    "Why was my card declined?",
    "Do you ship to Canada?",
    "How long does a refund take?",
    "Can I cancel my order?",
    "Is there a warranty on phones?",
]
CHAT_TURNS = [
    "Tell me about the history of Rome.",
    "What happened after that?",
    "Who were the most famous emperors?",
    "Summarise all of this in three sentences.",
]


def system_prompt(engine: LLMEngine, num_tokens: int) -> str:
    text, n = "You are the support assistant of a shop.", 0
    while len(engine.tokenizer(text)["input_ids"]) < num_tokens:
        n += 1
        text += " " + POLICY.format(n=n)
    return text


def chat_ids(engine: LLMEngine, messages: list[dict[str, str]]) -> list[int]:
    encoded = engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


async def one(engine: LLMEngine, request_id: str, ids: list[int], max_tokens: int) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    started = time.perf_counter()
    ttft, text = None, ""
    async for output in engine.generate(request_id, ids, params):
        if ttft is None and output.text:
            ttft = time.perf_counter() - started
        text += output.text
    return {"ttft_s": ttft, "text": text, "prompt_tokens": len(ids)}


async def shared_system_prompt(engine: LLMEngine, system: str, tag: str) -> dict[str, Any]:
    prompts = [
        chat_ids(engine, [{"role": "system", "content": system}, {"role": "user", "content": q}])
        for q in QUESTIONS
    ]
    one_by_one = [await one(engine, f"{tag}-seq{i}", ids, 16) for i, ids in enumerate(prompts)]
    burst = await asyncio.gather(
        *(one(engine, f"{tag}-burst{i}", ids, 16) for i, ids in enumerate(prompts))
    )
    return {"one_by_one": one_by_one, "burst": list(burst)}


async def chat(engine: LLMEngine, tag: str) -> list[dict[str, Any]]:
    messages: list[dict[str, str]] = []
    turns = []
    for number, question in enumerate(CHAT_TURNS):
        messages.append({"role": "user", "content": question})
        result = await one(engine, f"{tag}-turn{number}", chat_ids(engine, messages), 96)
        messages.append({"role": "assistant", "content": result["text"]})
        turns.append(result)
    return turns


def run_arm(model_config: ModelConfig, cache_dir: Path, tokens: int, system_tokens: int) -> dict:
    from serve_app.loading import build_llm_engine

    engine_options = model_config.engine.model_copy(update={"prefix_cache_tokens": tokens})
    engine = build_llm_engine(model_config.model_copy(update={"engine": engine_options}), cache_dir)
    try:
        system = system_prompt(engine, system_tokens)

        async def both() -> dict[str, Any]:
            await one(engine, "warmup", chat_ids(engine, [{"role": "user", "content": "Hi"}]), 4)
            return {
                "shared_system_prompt": await shared_system_prompt(engine, system, "s"),
                "chat": await chat(engine, "c"),
            }

        result = asyncio.run(both())
        stats = engine.stats()
        result["cached_prompt_tokens"] = stats.num_cached_prompt_tokens
        result["prompt_tokens"] = stats.num_prompt_tokens
        return result
    finally:
        engine.shutdown()


def ms(values: list[float]) -> str:
    return f"p50 {1000 * statistics.median(values):7.0f} ms, max {1000 * max(values):7.0f} ms"


def summary(arm: dict[str, Any]) -> dict[str, list[float]]:
    shared = arm["shared_system_prompt"]
    return {
        "system prompt, one by one (after the first)": [
            r["ttft_s"] for r in shared["one_by_one"][1:]
        ],
        "system prompt, 8 at once": [r["ttft_s"] for r in shared["burst"]],
        "chat turns 2-4": [r["ttft_s"] for r in arm["chat"][1:]],
    }


def texts(arm: dict[str, Any]) -> list[str]:
    shared = arm["shared_system_prompt"]
    return [r["text"] for r in shared["one_by_one"] + shared["burst"] + arm["chat"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-tokens", type=int, default=4096, help="prefix_cache_tokens (on)")
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs, alternating")
    parser.add_argument("--out", type=Path, default=Path("results/prefix_cache.json"))
    args = parser.parse_args()
    config = app_config_from_serve_config("config/serve.yaml")
    model_config = config.model(MODEL_ID)
    if model_config is None:
        raise SystemExit(f"config/serve.yaml has no {MODEL_ID}")
    runs: list[dict[str, Any]] = []
    for round_number in range(args.rounds):
        for name, tokens in (("off", 0), ("on", args.cache_tokens)):
            arm = run_arm(model_config, Path(config.cache_dir), tokens, args.system_tokens)
            runs.append({"round": round_number, "arm": name, **arm})
            print(
                f"round {round_number} prefix cache {name:3s} "
                f"(cached {arm['cached_prompt_tokens']} of {arm['prompt_tokens']} prompt tokens)"
            )
            for label, values in summary(arm).items():
                print(f"    {label:44s} TTFT {ms(values)}")
    same = all(texts(r) == texts(runs[0]) for r in runs)
    print(f"same greedy text in every run: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"settings": vars(args) | {"out": str(args.out)}, "runs": runs, "same_text": same},
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
