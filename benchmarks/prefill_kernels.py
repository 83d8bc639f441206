"""Prefill forwards of a native GGUF model through the int4 kernel against the same weights
unpacked to float32 per layer (quantized_linear.Q4_DEQUANTIZED_MIN_ROWS decides which one a
forward takes on q4_kernel.c, DEQUANTIZED_MIN_ROWS on torch's int4 kernel): ms per forward of
one prompt of N tokens, both paths interleaved (A B, A B, ..., median over rounds), and the
ratio. The crossover is where that constant belongs on the machine it ran on. Prints the
table; writes JSON.

    flock /tmp/serve-app-bench.lock .venv/bin/python benchmarks/prefill_kernels.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from quant_quality import INT4_PATHS, int4_path, load

from serve_app.engine import quantized_linear


@torch.no_grad()
def forward_ms(model: Any, ids: torch.Tensor, path: str) -> float:
    with int4_path(path):
        model(input_ids=ids, logits_to_keep=1)  # warm-up: first-touch of buffers, oneDNN state
        started = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        return (time.perf_counter() - started) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/serve.yaml")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 64, 128, 192, 256, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/prefill_kernels.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load(args.config, args.model, "native")
    ids = torch.randint(
        100, 10_000, (1, max(args.tokens)), generator=torch.Generator().manual_seed(0)
    )
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for num in args.tokens:
            for name in INT4_PATHS:
                times.setdefault(f"{num} {name}", []).append(forward_ms(model, ids[:, :num], name))
    rows = []
    print(f"{'tokens':>6} {'int4 ms':>9} {'float32 ms':>10} {'int4/float32':>12}")
    for num in args.tokens:
        int4, unpacked = (statistics.median(times[f"{num} {name}"]) for name in INT4_PATHS)
        rows.append(
            {"tokens": num, "int4_ms": int4, "float32_ms": unpacked, "ratio": int4 / unpacked}
        )
        print(f"{num:>6} {int4:>9.1f} {unpacked:>10.1f} {int4 / unpacked:>12.2f}")
    print(
        f"shipped: Q4_DEQUANTIZED_MIN_ROWS {quantized_linear.Q4_DEQUANTIZED_MIN_ROWS} "
        f"(q4_kernel.c), DEQUANTIZED_MIN_ROWS {quantized_linear.DEQUANTIZED_MIN_ROWS} "
        "(torch's int4 kernel)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"model": args.model, "rounds": args.rounds, "forwards": rows}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
