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
        num_tokens = 0
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        async for output in engine.generate(f"{batch_size}-{i}", ids, params):
            if num_tokens == 0:
                first_token_at.append(time.perf_counter() - started)
            num_tokens = output.num_generated_tokens
        return num_tokens

    num_tokens = sum(await asyncio.gather(*(one(i) for i in range(batch_size))))
    elapsed = time.perf_counter() - started
    return num_tokens / elapsed, sorted(first_token_at)[len(first_token_at) // 2]


def hf_generate_tok_s(engine: LLMEngine, batch_size: int, max_tokens: int) -> float:
    """Reference: transformers' own generate() on the same model, same batch, greedy."""
    tokenizer = engine.tokenizer
    ids = tokenizer(
        ["Write a long story about a dragon and a knight."] * batch_size, return_tensors="pt"
    ).to(engine.runner.device)
    kwargs = dict(
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    engine.runner.model.generate(
        **ids, max_new_tokens=4, do_sample=False, pad_token_id=kwargs["pad_token_id"]
    )  # warm-up
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    engine.runner.model.generate(**ids, **kwargs)
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * max_tokens / (time.perf_counter() - started)


def profile_steps(engine: LLMEngine, num_steps: int) -> str:
    """cProfile of prefill + decode steps at batch 1, driven in this thread by a second,
    unstarted engine on the same model (cProfile sees only the thread it runs in)."""
    import cProfile
    import io
    import pstats

    probe = LLMEngine(
        engine.runner.model,
        engine.tokenizer,
        max_num_seqs=1,
        max_model_len=engine.max_model_len,
        eos_token_ids=set(),
    )
    ids = list(engine.tokenizer("Write a long story about a dragon.")["input_ids"])
    probe.submit(
        "probe", ids, SamplingParams(temperature=0.0, max_tokens=num_steps), lambda _: None
    )
    torch.set_grad_enabled(False)
    profiler = cProfile.Profile()
    profiler.enable()
    started = time.perf_counter()
    probe.step()
    while probe.scheduler.running:
        probe.step()
    elapsed = time.perf_counter() - started
    profiler.disable()
    out = io.StringIO()
    out.write(f"{num_steps} tokens in {elapsed:.3f} s under cProfile\n")
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True, help="folder with config.json + tokenizer")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default="results/gpu_check.json")
    parser.add_argument("--compare-generate", action="store_true", help="also time generate()")
    parser.add_argument("--profile", action="store_true", help="cProfile 32 engine steps")
    args = parser.parse_args()
    report: dict[str, object] = {
        "cuda_available": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        make_random_model(Path(args.model_dir), Path(tmp))
        config = ModelConfig(
            id="smollm2-random",
            kind="chat",
            source=tmp,
            engine=EngineOptions(max_num_seqs=max(args.batch_sizes)),
        )
        engine = build_llm_engine(config, Path(tmp))
        report["engine_device"] = str(engine.runner.device)
        report["engine_dtype"] = str(next(engine.runner.model.parameters()).dtype)
        asyncio.run(decode(engine, 1, 8))  # warm-up
        rows = []
        for size in args.batch_sizes:
            tok_s, ttft = asyncio.run(decode(engine, size, args.max_tokens))
            row = {"batch": size, "tokens_per_s": round(tok_s, 1), "ttft_p50_s": round(ttft, 4)}
            if args.compare_generate:
                row["hf_generate_tokens_per_s"] = round(
                    hf_generate_tok_s(engine, size, args.max_tokens), 1
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
        report["decode"] = rows
        if args.profile:
            print(profile_steps(engine, 32), flush=True)
        engine.shutdown()
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
