"""Why the native path does not use fbgemm's dynamic int8 matmul, though it is the fastest
CPU kernel here for big batches (benchmarks/linear_kernels.py): the 4-bit layers' exact values
quantized to int8 per output channel, activations quantized to 7 bits at each call, and what
that does to the model, measured as quant_quality.py measures (teacher-forced KL to the float32
path, top-1 agreement, the Paris answer) for: every int4 layer with per-tensor activations
(fbgemm as it is); the same with each row first scaled to max |x| = 1 (per-token scales); and
per-token scales on gate/up only. Prints one line per variant.

    flock /tmp/serve-app-bench.lock .venv/bin/python benchmarks/int8_dynamic_quality.py
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from quant_quality import TEXT, greedy, load, teacher_forced

from serve_app.engine.quantized_linear import Int4Linear


class Int8DynamicLinear(torch.nn.Module):
    """fbgemm's dynamic int8 linear on a weight quantized per output channel (symmetric)."""

    def __init__(self, weight: torch.Tensor, per_token: bool) -> None:
        super().__init__()
        self.in_features, self.per_token = weight.shape[1], per_token
        scales = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).double()
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(quantized, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) if self.per_token else None
        if scale is not None:
            rows = rows / scale
        y = torch.ops.quantized.linear_dynamic(rows.contiguous(), self.packed, True)
        y = y * scale if scale is not None else y
        return y.view(*x.shape[:-1], -1)


def replace_int4_layers(model: Any, per_token: bool, only: tuple[str, ...] | None) -> None:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Int4Linear) and (only is None or name in only):
                setattr(module, name, Int8DynamicLinear(child.dequantized(), per_token))


VARIANTS = {
    "int8 dynamic, per-tensor activations": (False, None),
    "int8 dynamic, per-token activations": (True, None),
    "int8 dynamic, per-token, gate/up only": (True, ("gate_proj", "up_proj")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config/serve.yaml")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=1100, help="of the quality text")
    args = parser.parse_args()
    torch.set_num_threads(2)
    reference, tokenizer = load(args.config, args.model, "float32")
    ids = tokenizer(TEXT.read_text()).input_ids[: args.tokens]
    for variant, (per_token, only) in VARIANTS.items():
        model, _ = load(args.config, args.model, "native")
        replace_int4_layers(model, per_token, only)
        quality = teacher_forced(reference, model, ids)
        figures = {k: round(v, 5) for k, v in quality.items()}
        print(f"{variant}: {json.dumps(figures)} paris={greedy(model, tokenizer)!r}", flush=True)


if __name__ == "__main__":
    main()
