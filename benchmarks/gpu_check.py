"""CUDA path check for the engine: device pick, bf16, batched decode throughput.

Meant for a GPU machine without Ray or the model packages: it builds a model with the real
SmolLM2-135M architecture (config.json) and tokenizer but random weights, saves it, loads it
through serve_app.loading (device "auto" -> cuda, dtype "auto" -> bfloat16) and times greedy
decoding at several batch sizes. Random weights decode at the same speed as trained ones.

    python benchmarks/gpu_check.py --model-dir .gpu/smollm2 --out results/gpu_check.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from serve_app.config import EngineOptions, ModelConfig
from serve_app.engine.llm_engine import LLMEngine
from serve_app.engine.types import SamplingParams
from serve_app.loading import build_llm_engine


def make_random_model(model_dir: Path, target: Path) -> None:
    config = AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)


async def decode(engine: LLMEngine, batch_size: int, max_tokens: int) -> tuple[float, float]:
    ids = list(engine.tokenizer("Write a long story about a dragon and a knight.")["input_ids"])
    first_token_at: list[float] = []
    started = time.perf_counter()

    async def one(i: int) -> int:
        last = None
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        async for last in engine.generate(f"{batch_size}-{i}", ids, params):
            if not first_token_at or len(first_token_at) <= i:
                first_token_at.append(time.perf_counter() - started)
        return last.num_generated_tokens if last else 0

    num_tokens = sum(await asyncio.gather(*(one(i) for i in range(batch_size))))
    elapsed = time.perf_counter() - started
    return num_tokens / elapsed, sorted(first_token_at)[len(first_token_at) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True, help="folder with config.json + tokenizer")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default="results/gpu_check.json")
    args = parser.parse_args()
    report: dict[str, object] = {
        "cuda_available": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        make_random_model(Path(args.model_dir), Path(tmp))
        config = ModelConfig(id="smollm2-random", kind="chat", source=tmp,
                             engine=EngineOptions(max_num_seqs=max(args.batch_sizes)))
        engine = build_llm_engine(config, Path(tmp))
        report["engine_device"] = str(engine.device)
        report["engine_dtype"] = str(next(engine.model.parameters()).dtype)
        asyncio.run(decode(engine, 1, 8))  # warm-up
        rows = []
        for size in args.batch_sizes:
            tok_s, ttft = asyncio.run(decode(engine, size, args.max_tokens))
            rows.append({"batch": size, "tokens_per_s": round(tok_s, 1), "ttft_p50_s": round(ttft, 4)})
            print(f"batch {size:3d}: {tok_s:8.1f} tok/s  TTFT p50 {ttft * 1000:.1f} ms", flush=True)
        report["decode"] = rows
        engine.shutdown()
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
