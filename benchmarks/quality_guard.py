"""Quality guard for quantization: greedy tokens of the quantized model vs the unquantized one.

For each prompt of a fixed set, both engines decode greedily; agreement is the share of the
first N token positions (N=32) where the two chose the same token, over all prompts. Also
checks the quantized model still answers "Paris". Prints a table; writes JSON.

    .venv/bin/python benchmarks/quality_guard.py --model smollm2-135m-instruct --quantization int8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from serve_app.config import app_config_from_serve_config
from serve_app.engine.llm_engine import LLMEngine
from serve_app.engine.types import SamplingParams
from serve_app.loading import build_llm_engine

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a neural network is in two sentences.",
    "List three benefits of regular exercise.",
    "How do I reverse a list in Python?",
    "What causes the seasons on Earth?",
    "Give me a recipe idea for dinner with rice and beans.",
    "Summarize the plot of Romeo and Juliet.",
    "What is the difference between weather and climate?",
    "Translate 'good morning' into Spanish and French.",
]


async def greedy_ids(engine: LLMEngine, prompt: str, num_tokens: int) -> tuple[list[int], str]:
    encoded = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    ids = list(encoded["input_ids"])
    captured: list[int] = []
    processor = engine.processor
    original = processor.append_token  # record the chosen ids, not just the text

    def recording_append(seq, token_id):  # type: ignore[no-untyped-def]
        captured.append(token_id)
        return original(seq, token_id)

    processor.append_token = recording_append  # type: ignore[method-assign]
    text = ""
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens)
    async for output in engine.generate(f"guard-{time.monotonic_ns()}", ids, params):
        text += output.text
    processor.append_token = original  # type: ignore[method-assign]
    return captured, text


def agreement(reference: list[int], candidate: list[int], num_tokens: int) -> tuple[int, int]:
    """(matching positions, positions compared); a shorter output counts as mismatches."""
    same = sum(
        1 for a, b in zip(reference[:num_tokens], candidate[:num_tokens], strict=False) if a == b
    )
    return same, max(min(num_tokens, len(reference)), min(num_tokens, len(candidate)))


async def compare(reference: LLMEngine, candidate: LLMEngine, num_tokens: int) -> dict:
    rows = []
    total_same = total = 0
    for prompt in PROMPTS:
        ref_ids, _ = await greedy_ids(reference, prompt, num_tokens)
        cand_ids, cand_text = await greedy_ids(candidate, prompt, num_tokens)
        same, compared = agreement(ref_ids, cand_ids, num_tokens)
        total_same += same
        total += compared
        rows.append({"prompt": prompt, "agreement": same / compared, "candidate_text": cand_text})
    paris_text = (await greedy_ids(candidate, PROMPTS[0], 64))[1]
    return {
        "agreement": total_same / total,
        "paris": "Paris" in paris_text,
        "paris_text": paris_text,
        "prompts": rows,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="config/serve.yaml")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quantization", default="int8")
    parser.add_argument("--num-tokens", type=int, default=32)
    parser.add_argument("--min-agreement", type=float, default=0.90)
    parser.add_argument("--out", default="results/quality_guard.json")
    args = parser.parse_args()
    config = app_config_from_serve_config(args.config)
    model = config.model(args.model)
    if model is None:
        parser.error(f"no model {args.model} in {args.config}")
    plain = model.model_copy(deep=True)
    plain.engine.quantization = "none"
    quantized = model.model_copy(deep=True)
    quantized.engine.quantization = args.quantization
    reference = build_llm_engine(plain, Path(config.cache_dir))
    candidate = build_llm_engine(quantized, Path(config.cache_dir))
    result = asyncio.run(compare(reference, candidate, args.num_tokens))
    reference.shutdown()
    candidate.shutdown()
    result.update(model=args.model, quantization=args.quantization, num_tokens=args.num_tokens)
    for row in result["prompts"]:
        print(f"{row['agreement']:6.1%}  {row['prompt']}")
    passed = result["agreement"] >= args.min_agreement and result["paris"]
    print(
        f"agreement {result['agreement']:.1%} (min {args.min_agreement:.0%}); "
        f"Paris: {result['paris']} -> {'PASS' if passed else 'FAIL'}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
