"""Linear layers and embedding lookups on 4-bit and 8-bit weights (CPU, torch's int4/int8 ops).

GGUF weights keep their own quantized form (gguf_weights.py repacks them): Q4_0/Q4_1/Q4_K
blocks become int4 groups of 32 for `_weight_int4pack_mm_for_cpu`, other types (Q8_0, Q5_x,
Q6_K) per-channel int8 for `_weight_int8pack_mm`. Both kernels take bf16 activations (the fast
path here; float32 activations measured 7-30x slower); the residual stream stays float32:
each layer casts its input to bf16 and its output back.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 32


class Int4Linear(torch.nn.Module):
    """y = x @ w.T (+ bias), w = (q - 8) * scale + zero per group of 32 input columns."""

    def __init__(
        self,
        q: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        """q: [N, K] integers 0..15; scales, zeros: [N, K / 32] (any float dtype)."""
        super().__init__()
        self.out_features, self.in_features = q.shape
        if self.in_features % GROUP_SIZE:
            raise ValueError(f"in_features {self.in_features} is not a multiple of {GROUP_SIZE}")
        self.packed_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), 1
        )
        # [K / 32, N, 2]: the kernel's layout of (scale, zero) per group and output channel.
        self.scales_and_zeros = (
            torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
        )
        self.bias = None if bias is None else bias.detach().float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, self.packed_weight, GROUP_SIZE, self.scales_and_zeros
        ).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, [N, K] float32 (for exactness checks)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        scales_and_zeros = self.scales_and_zeros.float()  # exact: they are bf16 values
        # The kernel's float32 path: its output is not rounded to bf16.
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye.float(), self.packed_weight, GROUP_SIZE, scales_and_zeros
        ).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 g32"


class Int8Linear(torch.nn.Module):
    """y = x @ (q * scale).T (+ bias), q int8 [N, K], one scale per output channel."""

    def __init__(
        self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.weight_int8 = q.to(torch.int8).contiguous()
        self.scales = scales.to(torch.bfloat16).contiguous()
        self.bias = None if bias is None else bias.detach().float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float().unsqueeze(1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(torch.nn.Module):
    """Embedding lookup on the rows of an Int8Linear's weight (a tied head and its lookup share
    one int8 copy of the vocabulary matrix). `embed_scale`: Gemma multiplies looked-up rows."""

    def __init__(self, table: Int8Linear, embed_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.weight_int8, self.scales = table.weight_int8, table.scales
        self.embed_scale = None if embed_scale is None else embed_scale.float().clone()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight_int8[input_ids].float() * self.scales[input_ids].float().unsqueeze(-1)
        return rows if self.embed_scale is None else rows * self.embed_scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of a float weight [N, K]: (q int8, scales float32 [N]). The
    scales are rounded to bf16 first (the kernel's dtype) so q is chosen for the scale used."""
    peak = weight.abs().amax(dim=1).clamp(min=1e-12)
    scales = (peak / 127).to(torch.bfloat16).float()
    q = torch.round(weight / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q, scales


def has_int4_layers(model: torch.nn.Module) -> bool:
    """Whether the model was loaded with native 4-bit weights (some layer is an Int4Linear)."""
    return any(isinstance(module, Int4Linear) for module in model.modules())


def can_run_int4() -> bool:
    """Whether this torch has the CPU int4 kernels (2.5+ names them *_for_cpu)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


# The CPU int4 packing interleaves blocks of 64 output rows: layers whose row counts are all
# multiples of it can be packed apart and concatenated (checked against packing them together).
_PACK_BLOCK_ROWS = 64


def fuse_int4(linears: list[Int4Linear]) -> Int4Linear | None:
    """One layer computing the given layers' outputs side by side (same input, one kernel
    call); the given layers keep working as views of its weight, so no memory is added.
    None when a layer's rows do not fill whole packing blocks, they differ in input, or one
    has a bias (not needed by the models fused so far)."""
    if any(linear.out_features % _PACK_BLOCK_ROWS or linear.bias is not None for linear in linears):
        return None
    if len({linear.in_features for linear in linears}) != 1:
        return None
    fused = Int4Linear.__new__(Int4Linear)
    torch.nn.Module.__init__(fused)
    fused.in_features = linears[0].in_features
    fused.out_features = sum(linear.out_features for linear in linears)
    fused.packed_weight = torch.cat([linear.packed_weight for linear in linears])
    fused.scales_and_zeros = torch.cat([linear.scales_and_zeros for linear in linears], dim=1)
    fused.bias = None
    start = 0
    for linear in linears:  # the separate layers now read the fused copy
        linear.packed_weight = fused.packed_weight[start : start + linear.out_features]
        start += linear.out_features
    return fused
