"""The CPU matmul kernels native GGUF weights can use, on a model's linear shapes: q4_kernel.c
(serve_app/engine/q4_native.py: 4-bit groups of 32, float32 activations in and out, quantized
to 16 bits per block inside; where it builds), torch's int4 kernel (groups of 32), torch's int8
kernel (one scale per output channel), bf16 weights prepacked for oneDNN, plain bf16
(F.linear), fp16 weights prepacked for fbgemm (float32 activations in and out: the output
layer's form), float32 (F.linear: what big prefill forwards run on int4 weights unpacked to
float32) and fbgemm's dynamic int8 (per-channel int8 weights, activations quantized per tensor
at each call: fast, but see docs/benchmarks.md, session 16, for what it does to the model).
Random weights (speed does not depend on the values); bf16 activations for the others, as the
layers run them. Interleaved: each round times every kernel once per shape and batch, the
figure is the median over rounds. Prints ms per call; writes JSON.

    flock /tmp/serve-app-bench.lock .venv/bin/python benchmarks/linear_kernels.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from serve_app.engine.q4_native import Q4Weight, q4_kernel
from serve_app.engine.quantized_linear import _bf16_packing_available

# Gemma-3-270m: q, gate/up, down, the tied vocabulary head; SmolLM2-135M: gate/up, head.
SHAPES = [(1024, 640), (2048, 640), (640, 2048), (262144, 640), (1536, 576), (49152, 576)]


def ms_per_call(call: Callable[[], object], calls: int) -> float:
    for _ in range(3):
        call()
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls * 1e3


def kernels(rows: int, cols: int, batch: int) -> dict[str, Callable[[], object]]:
    x = torch.randn(batch, cols).bfloat16()
    int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (rows, cols), dtype=torch.int32), 1
    )
    scales_and_zeros = torch.rand(cols // 32, rows, 2).bfloat16()
    int8 = torch.randint(-127, 127, (rows, cols), dtype=torch.int8)
    int8_scales = torch.rand(rows).bfloat16()
    plain = torch.randn(rows, cols).bfloat16()
    # oneDNN packs bf16 only where the CPU has bf16 instructions (not on AVX2 alone)
    packed = torch.ops.mkldnn._reorder_linear_weight(plain) if _bf16_packing_available() else None
    x_float, fp16 = x.float(), torch.ops.quantized.linear_prepack_fp16(plain.half(), None)
    plain_float = plain.float()
    int8_dynamic = torch.ops.quantized.linear_prepack(
        torch.quantize_per_channel(
            plain_float,
            torch.rand(rows).double() * 0.01 + 1e-3,
            torch.zeros(rows).long(),
            0,
            torch.qint8,
        ),
        None,
    )
    found: dict[str, Callable[[], object]] = {
        "int4 g32": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, int4, 32, scales_and_zeros
        ),
        "int8 per-channel": lambda: torch.ops.aten._weight_int8pack_mm(x, int8, int8_scales),
        "bf16 plain": lambda: torch.nn.functional.linear(x, plain),
        "fp16 fbgemm": lambda: torch.ops.quantized.linear_dynamic_fp16(x_float, fp16),
        "float32": lambda: torch.nn.functional.linear(x_float, plain_float),
        "int8 dynamic fbgemm": lambda: torch.ops.quantized.linear_dynamic(
            x_float, int8_dynamic, True
        ),
    }
    if q4_kernel() is not None:
        q4 = Q4Weight.from_groups(
            torch.randint(0, 16, (rows, cols)),
            torch.rand(rows, cols // 32) * 0.01,
            torch.randn(rows, cols // 32) * 0.01,
        )
        found["q4_kernel"] = lambda: q4.matmul(x_float)
    if packed is not None:
        found["bf16 packed"] = lambda: torch.ops.mkldnn._linear_pointwise(
            x, packed, None, "none", [], ""
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--shapes", nargs="+", default=None, help="rowsxcols to time (default: all of SHAPES)"
    )
    parser.add_argument("--out", default="results/linear_kernels.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {}
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    for _ in range(args.rounds):
        for rows, cols in shapes:
            for batch in args.batches:
                calls = 10 if rows > 100_000 else 100
                for name, call in kernels(rows, cols, batch).items():
                    key = f"{rows}x{cols} b{batch} {name}"
                    times.setdefault(key, []).append(ms_per_call(call, calls))
    results = {key: statistics.median(values) for key, values in times.items()}
    for key, value in results.items():
        print(f"{key:40s} {value:8.3f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": args.rounds, "ms": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
