"""The offline engine of two (or more) source trees, interleaved: A B, A B, ... per round.

Each run is a fresh process with PYTHONPATH set to one tree, which builds SmolLM2's engine as a
replica does (serve_app.loading.build_llm_engine, config/serve.yaml's options) and measures
greedy, fixed-length (ignore_eos) generation at each concurrency. Ratios are the median over
rounds of each round's tree / first tree (this VM's speed drifts; docs/benchmarks.md).

    git worktree add /tmp/before HEAD~3
    .venv/bin/python benchmarks/engine_ab.py --trees /tmp/before . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

# Runs inside the tree under test: only names both old and new trees have.
_RUN_ONE = r"""
import asyncio, json, sys, time
from pathlib import Path
import yaml
from serve_app.config import ModelConfig
from serve_app.engine.types import SamplingParams
from serve_app.loading import build_llm_engine

model_id, max_tokens = sys.argv[1], int(sys.argv[3])
levels = [int(x) for x in sys.argv[2].split(",")]
apps = yaml.safe_load(Path("config/serve.yaml").read_text())["applications"]
args = next(a["args"] for a in apps if a["args"].get("model", {}).get("id") == model_id)
model = ModelConfig.model_validate(args["model"])
engine = build_llm_engine(model, Path(args["cache_dir"]).expanduser())
prompts = ["Tell me a story about a dragon.", "Explain how a bicycle works.",
           "Write a poem about the sea.", "What is the capital of France and why?"]

def prompt_ids(i):
    messages = [{"role": "user", "content": prompts[i % len(prompts)] + f" (request {i})"}]
    encoded = engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])

async def one(tag, i, n):
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    started, first, count = time.perf_counter(), None, 0
    async for out in engine.generate(f"{tag}-{i}", prompt_ids(i), params):
        first = first or time.perf_counter() - started
        count = out.num_generated_tokens
    return first, count

async def level(c):
    started = time.perf_counter()
    results = await asyncio.gather(*(one(f"c{c}", i, max_tokens) for i in range(c)))
    wall = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results)
    return {"concurrency": c, "tok_s": sum(r[1] for r in results) / wall,
            "ttft_p50_ms": ttfts[len(ttfts) // 2] * 1e3}

async def main():
    await asyncio.gather(*(one("warmup", i, 16) for i in range(4)))
    return [await level(c) for c in levels]

try:
    print(json.dumps(asyncio.run(main())))
finally:
    engine.shutdown()
"""


def run_tree(tree: Path, model_id: str, levels: list[int], max_tokens: int) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    command = [
        sys.executable,
        "-c",
        _RUN_ONE,
        model_id,
        ",".join(map(str, levels)),
        str(max_tokens),
    ]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trees", nargs="+", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", default="results/engine_ab.json")
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    for round_index in range(args.rounds):
        for tree in args.trees:
            rows = run_tree(tree, args.model, args.levels, args.max_tokens)
            runs.append({"round": round_index, "tree": str(tree), "levels": rows})
            shown = "  ".join(
                f"c{r['concurrency']} {r['tok_s']:6.1f} tok/s ttft {r['ttft_p50_ms']:6.0f} ms"
                for r in rows
            )
            print(f"round {round_index} {tree}: {shown}", flush=True)
    ratios = median_ratios(runs, args.trees, args.levels)
    for tree, by_level in ratios.items():
        print(
            f"median ratio {tree} / {args.trees[0]}: "
            + ", ".join(f"c{c} {ratio:.3f}" for c, ratio in by_level.items())
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report = {"settings": {**vars(args), "trees": list(map(str, args.trees))}, "runs": runs}
    Path(args.out).write_text(json.dumps({**report, "median_ratios": ratios}, indent=2))


def median_ratios(
    runs: list[dict[str, Any]], trees: list[Path], levels: list[int]
) -> dict[str, dict[int, float]]:
    """Per tree and level: median over rounds of (tree's tok/s / first tree's, same round)."""

    def tok_s(round_index: int, tree: Path, level: int) -> float:
        run = next(r for r in runs if r["round"] == round_index and r["tree"] == str(tree))
        return float(next(row["tok_s"] for row in run["levels"] if row["concurrency"] == level))

    rounds = sorted({r["round"] for r in runs})
    return {
        str(tree): {
            level: statistics.median(
                tok_s(i, tree, level) / tok_s(i, trees[0], level) for i in rounds
            )
            for level in levels
        }
        for tree in trees[1:]
    }


if __name__ == "__main__":
    main()
