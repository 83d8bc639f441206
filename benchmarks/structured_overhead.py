"""What constrained decoding costs: SmolLM2's engine (built as a replica builds it) at
concurrency c, every request unconstrained, then every request with a JSON schema, in
alternating rounds (A B, A B, ...); prints tok/s per round and the median ratio, and the
compile time of the schema cold and repeated.

    .venv/bin/python benchmarks/structured_overhead.py --rounds 3 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from serve_app.config import ModelConfig
from serve_app.engine.llm_engine import LLMEngine
from serve_app.engine.types import Constraint, SamplingParams
from serve_app.loading import build_llm_engine

# Long string fields so requests run many tokens under the grammar, as a real extraction does.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "genre": {"enum": ["drama", "comedy", "action", "documentary"]},
        "summary": {"type": "string", "maxLength": 400},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
    },
    "required": ["title", "year", "genre", "summary", "tags"],
    "additionalProperties": False,
}
PROMPT = "Describe a film you like as a JSON object with title, year, genre, summary and tags."


def smollm2_engine(config_path: str) -> LLMEngine:
    apps = yaml.safe_load(Path(config_path).read_text())["applications"]
    args = next(
        a["args"] for a in apps if a["args"].get("model", {}).get("id", "").startswith("smollm2")
    )
    model = ModelConfig.model_validate(args["model"])
    return build_llm_engine(model, Path(args["cache_dir"]).expanduser())


async def run_level(
    engine: LLMEngine, concurrency: int, max_tokens: int, constraint: Constraint | None, tag: str
) -> dict[str, Any]:
    async def one(index: int) -> int:
        messages = [{"role": "user", "content": f"{PROMPT} (film {index})"}]
        encoded = engine.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        params = SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=index, constraint=constraint
        )
        count = 0
        async for output in engine.generate(f"{tag}-{index}", list(encoded["input_ids"]), params):
            count = output.num_generated_tokens
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(concurrency)))
    wall = time.perf_counter() - started
    return {"tok_s": sum(counts) / wall, "tokens": sum(counts), "wall_s": wall}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    engine = smollm2_engine(args.config)
    try:
        constraint = Constraint("json_schema", json.dumps(SCHEMA))
        started = time.perf_counter()
        await engine.compile_grammar(constraint)
        cold_ms = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        await engine.compile_grammar(Constraint("json_schema", json.dumps(SCHEMA)))
        cached_ms = (time.perf_counter() - started) * 1e3
        print(
            f"schema compile: cold {cold_ms:.1f} ms (with the tokenizer's info), "
            f"repeat {cached_ms:.2f} ms"
        )
        await run_level(engine, 4, 16, None, "warmup")
        rounds = []
        for index in range(args.rounds):
            free = await run_level(engine, args.concurrency, args.max_tokens, None, f"free{index}")
            fixed = await run_level(
                engine, args.concurrency, args.max_tokens, constraint, f"schema{index}"
            )
            rounds.append({"unconstrained": free, "json_schema": fixed})
            print(
                f"round {index}: unconstrained {free['tok_s']:6.1f} tok/s  "
                f"json_schema {fixed['tok_s']:6.1f} tok/s  "
                f"ratio {fixed['tok_s'] / free['tok_s']:.3f}",
                flush=True,
            )
        ratio = statistics.median(
            r["json_schema"]["tok_s"] / r["unconstrained"]["tok_s"] for r in rounds
        )
        print(f"median ratio json_schema / unconstrained at c={args.concurrency}: {ratio:.3f}")
        return {
            "compile_cold_ms": cold_ms,
            "compile_cached_ms": cached_ms,
            "rounds": rounds,
            "median_ratio": ratio,
        }
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="config/serve.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default="results/structured_overhead.json")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), **result}, indent=2))


if __name__ == "__main__":
    main()
