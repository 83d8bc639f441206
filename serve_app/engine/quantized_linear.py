"""Linear layers and embedding lookups on GGUF weights kept quantized (CPU): int4 and bf16.

GGUF weights keep their own quantized form (gguf_weights.py repacks them): Q4_0/Q4_1/Q4_K
blocks become int4 groups of 32, multiplied by q4_kernel.c (integer dot products on 16-bit
activations; q4_native.py) where it builds, else by torch's `_weight_int4pack_mm_for_cpu` (bf16
activations: its fast path; float32 activations measured 7-30x slower); other types (Q8_0,
Q5_x, Q6_K) bf16 weights prepacked for oneDNN. The residual stream stays float32. Big prefill
forwards (Q4_DEQUANTIZED_MIN_ROWS tokens or more on q4_kernel.c, DEQUANTIZED_MIN_ROWS on
torch's kernel) multiply int4 layers by their weights unpacked to float32 instead (the same
values), or, where the model keeps fp16 copies
(fp16_copy_min_rows), every prefill forward through the model's own forward and the written-out
Llama step's forwards (decode steps, and prefills where decode_kernel.c runs) of that many rows
or more multiply by the copy (fbgemm's fp16 GEMM).
A Q8_0 vocabulary is looked up in the file's own rows (Q8Embedding), and a tied output layer
multiplies by those same rows where q4_kernel.c runs (Q8Linear); otherwise the output layer is
fp16 (Fp16Linear). Logits are float32 either way.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch

from serve_app.engine.q4_native import GROUP, Q4Weight, q4_kernel, q8_matmul

GROUP_SIZE = GROUP
Q8_BLOCK_BYTES = 34  # a Q8_0 block: an fp16 scale, then 32 int8
# The CPU int4 packing interleaves blocks of 64 output rows: layers whose row counts are all
# multiples of it can be packed apart and concatenated (checked against packing them together).
_PACK_BLOCK_ROWS = 64
# From this many rows (tokens) on, an Int4Linear on torch's int4 kernel multiplies by its weight
# dequantized to float32 (float32 sgemm) instead: on CPUs without bf16 instructions (this AVX2
# VM) torch's int4 kernel does ~75 GFLOP/s at any batch, float32 sgemm ~150 once rows are many,
# and dequantizing all of SmolLM2's 4-bit weights costs ~110 ms a forward: the crossover is
# ~160 rows; prefill forwards of 192-512 tokens are 1.4-1.6x faster
# (benchmarks/prefill_kernels.py).
DEQUANTIZED_MIN_ROWS = 192
# The same for q4_kernel.c's layers: its tiled float path (session 25) is faster than the
# unpacking up to ~1024 tokens (SmolLM2 prefill int4/float32 0.78 at 128 tokens, 0.89 at
# 256-512, 1.04 at 1024; benchmarks/prefill_kernels.py, docs/benchmarks.md).
Q4_DEQUANTIZED_MIN_ROWS = 1024
# An Int4Linear may also hold an fp16 copy of its weight (add_fp16_copies, engine option
# fp16_copy_min_rows). In a whole decode step the int4 kernel wins at a few rows: the copy is ~3.3
# bytes a weight once fbgemm has packed it, and a step reads all of them from memory (SmolLM2:
# ~350 MB a step against ~60 MB in int4). From a few rows on, fbgemm's fp16 GEMM was ~2x torch's
# int4 kernel and q4_kernel.c's first float path (session 17); q4_kernel.c's tiled float path is
# faster than the copies in whole decode steps at every row count on this AVX2 VM (session 25:
# 0.79-0.93x their step time at 16 rows), so no shipped model keeps copies
# (benchmarks/fp16_copy.py; docs/benchmarks.md).


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
        # q4_kernel.c's form where it runs here, else torch's int4 packing (one of the two)
        self.q4: Q4Weight | None = None
        self.packed_weight: torch.Tensor | None = None
        if q4_kernel() is not None:
            self.q4 = Q4Weight.from_groups(q, scales, zeros)
        else:
            self.packed_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q.to(torch.int32).contiguous(), 1
            )
            # [K / 32, N, 2]: the kernel's layout of (scale, zero) per group and output channel.
            self.scales_and_zeros = (
                torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
            )
        self.bias = None if bias is None else bias.detach().float().clone()
        # fp16 copies of the weight's rows, in order (one; or one per layer fused into this one)
        self.fp16_parts: list[Fp16Linear] = []
        self.fp16_min_rows = 0

    def forward(self, x: torch.Tensor, decode: bool = False) -> torch.Tensor:
        """decode: x is the written-out step's rows (decode_rows says so): with an fp16 copy,
        fewer than fp16_min_rows of them take the int4 kernel. A forward of the model's own
        (prefill off the C path) takes the copy at any length, so there a prompt's keys and
        values do not depend on how much of it came from the prefix cache."""
        rows = x.reshape(-1, self.in_features)
        if self._takes_copy(rows.shape[0], decode):
            y = self._fp16_matmul(rows).to(x.dtype)
        elif rows.shape[0] >= self.dequantized_min_rows() and self._unpackable():
            y = torch.mm(rows.float(), self._float32_weight_t()).to(x.dtype)  # prefill
        else:
            y = _int4_matmul(self, rows).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def decode_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """forward(rows, decode=True) for the written-out step's 2-D float32 rows (a decode
        step's, or a C prefill's tokens: under the copy's rows those take the kernel too, so a
        prompt's rest after a cached prefix can differ from the whole prompt's in float
        rounding), the common case (q4_kernel.c, no bias, under the copy's rows) first: ~120
        calls a step, and forward's general checks cost ~10 us a call at one row."""
        num_rows = rows.shape[0]
        small = num_rows < Q4_DEQUANTIZED_MIN_ROWS and not self._takes_copy(num_rows)
        if self.q4 is not None and self.bias is None and small:
            return _int4_matmul(self, rows)
        return self.forward(rows, decode=True)

    def dequantized_min_rows(self) -> int:
        """From this many rows on, this layer multiplies by its weight unpacked to float32."""
        return Q4_DEQUANTIZED_MIN_ROWS if self.q4 is not None else DEQUANTIZED_MIN_ROWS

    def _takes_copy(self, num_rows: int, decode: bool = True) -> bool:
        """Whether these rows multiply by the fp16 copy: every forward of the model's own, and
        the written-out step's forwards of fp16_min_rows rows or more."""
        return bool(self.fp16_parts) and (not decode or num_rows >= self.fp16_min_rows)

    def add_fp16_copy(self, min_rows: int) -> None:
        """Keeps the weight in fp16 too (the kernel's values, rounded once) for the forwards
        `_takes_copy` names (min_rows rows or more on the written-out step)."""
        weight = self._float32_weight_t().t() if self._unpackable() else self.dequantized()
        self.fp16_parts = [Fp16Linear(weight)]
        self.fp16_min_rows = min_rows

    def _fp16_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        outputs = [part(rows) for part in self.fp16_parts]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _unpackable(self) -> bool:
        """Whether _float32_weight_t can read this weight back (torch's packing: a layout it
        knows, whole blocks of 64 output rows only)."""
        if self.q4 is not None:
            return True
        return _int4pack_unpacker() is not None and self.out_features % _PACK_BLOCK_ROWS == 0

    def _float32_weight_t(self) -> torch.Tensor:
        """The weight the kernel multiplies by, transposed [K, N] float32, unpacked from the
        kernel's layout into this thread's workspace (valid until the next call)."""
        n, k = self.out_features, self.in_features
        if self.q4 is not None:
            return self.q4.dequantize_into(_float32_workspace(k * n)).t()
        unpack = _int4pack_unpacker()
        assert self.packed_weight is not None and unpack is not None
        weight_t = _float32_workspace(k * n)
        unpack(self.packed_weight, weight_t.view(k, n // _PACK_BLOCK_ROWS, 2, 32))
        scales_and_zeros = self.scales_and_zeros.float()  # [K / 32, N, 2]
        scale = scales_and_zeros[..., 0].unsqueeze(1)
        offset = (scales_and_zeros[..., 1] - 8 * scales_and_zeros[..., 0]).unsqueeze(1)
        groups = weight_t.view(k // GROUP_SIZE, GROUP_SIZE, n)
        torch.addcmul(offset, groups, scale, out=groups)  # (q - 8) * scale + zero
        return weight_t.view(k, n)

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, [N, K] float32 (for exactness checks)."""
        if self.q4 is not None:
            return self.q4.dequantize_into(torch.empty(self.out_features * self.in_features))
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        scales_and_zeros = self.scales_and_zeros.float()  # exact: they are bf16 values
        # The kernel's float32 path: its output is not rounded to bf16.
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye.float(), self.packed_weight, GROUP_SIZE, scales_and_zeros
        ).t()

    def extra_repr(self) -> str:
        copy = f", fp16 copy from {self.fp16_min_rows} rows" if self.fp16_parts else ""
        kernel = "q4_kernel" if self.q4 is not None else "torch int4"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 g32 ({kernel}){copy}"
        )


class Bf16Linear(torch.nn.Module):
    """y = x @ w.T (+ bias) with w held in bf16, prepacked once for oneDNN where this CPU has
    bf16 matmuls (avx512_bf16/AMX), plain bf16 otherwise. For the GGUF types the int4 kernel
    cannot take (Q5_x, Q6_K, Q8_0): their values to bf16 rounding. Per-channel int8 of the same
    tensors (torch's int8 kernel) lost too much on Gemma-3 (KL 0.0077 to float32, top-1 94.5%):
    prepacked bf16 is 0.6-0.9x its speed at batch 1 and 2-2.8x at batch 16 on Gemma's shapes
    (benchmarks/linear_kernels.py; docs/benchmarks.md, session 13)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        plain = weight.detach().to(torch.bfloat16).contiguous()
        self.packed = _bf16_packing_available()
        self.weight_bf16 = torch.ops.mkldnn._reorder_linear_weight(plain) if self.packed else plain
        self.bias = None if bias is None else bias.detach().float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x.reshape(-1, self.in_features).to(torch.bfloat16)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(rows, self.weight_bf16, None, "none", [], "")
        return torch.nn.functional.linear(rows, self.weight_bf16)

    def dequantized(self) -> torch.Tensor:
        """The bf16 weight [N, K] as float32, read back through the matmul (exact: one
        product per output)."""
        return self._matmul(torch.eye(self.in_features, dtype=torch.bfloat16)).float().t()

    def extra_repr(self) -> str:
        form = "bf16 packed" if self.packed else "bf16"
        return f"in_features={self.in_features}, out_features={self.out_features}, {form}"


class Fp16Linear(torch.nn.Module):
    """y = x @ w.T (+ bias) with w held in fp16 (fbgemm's fp16 GEMM), float32 in and float32
    out. For the output layer, whose logits are compared with each other: a bf16 matmul's bf16
    output moves a logit of ~18 by up to 0.06, which turned SmolLM2's first token for "What is
    the capital of France?" from "The" (0.152 vs "L" 0.140 in float32) into a tie it lost, and
    the answer degenerated. fp16 keeps 3 more bits of each weight and the logits in float32:
    max logit error 0.0011 vs bf16's 0.019 on SmolLM2's head; 1.2 vs 2.0 ms at batch 1, 5.4 vs
    3.2 ms at batch 16 (docs/benchmarks.md, session 14)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        fp16 = weight.detach().to(torch.float16).contiguous()
        plain_bias = None if bias is None else bias.detach().float().contiguous()
        self.packed = torch.ops.quantized.linear_prepack_fp16(fp16, plain_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float().contiguous()
        y = torch.ops.quantized.linear_dynamic_fp16(rows, self.packed)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The fp16 weight [N, K] as float32."""
        weight, _ = torch.ops.quantized.linear_unpack_fp16(self.packed)
        return weight.float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16"


class Q8Linear(torch.nn.Module):
    """y = x @ w.T with w the GGUF's own Q8_0 rows (per 32 values an fp16 scale, then 32 int8),
    multiplied by q4_kernel.c's q8_matmul (activations quantized to 16 bits per block of 32
    under 8 rows, its float path from 8; float32 logits). For a tied output layer: it reads the
    same mapped rows as the Q8Embedding lookup, so the vocabulary is in memory once, at half the
    bytes of an fp16 copy (a decode step reads all of it), and its values are the file's
    exactly."""

    def __init__(self, rows: torch.Tensor) -> None:
        super().__init__()
        self.rows = rows  # [N, K / 32 * 34] uint8, may be a map of the file
        self.out_features = rows.shape[0]
        self.in_features = rows.shape[1] // Q8_BLOCK_BYTES * GROUP_SIZE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = q8_matmul(x.reshape(-1, self.in_features), self.rows)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] as float32 (exactness checks)."""
        return q8_rows_as_float(self.rows)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0 rows"


def _int4_matmul(layer: Int4Linear, rows: torch.Tensor) -> torch.Tensor:
    """rows [M, K] through the layer's int4 kernel (q4_kernel.c's float32 output, torch's
    bf16); a module function so tests can see which path a forward takes."""
    if layer.q4 is not None:
        return layer.q4.matmul(rows)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        rows.to(torch.bfloat16), layer.packed_weight, GROUP_SIZE, layer.scales_and_zeros
    )


_workspace = threading.local()


# torch's CPU int4 packing differs by the instruction set its kernel dispatches to. Each unpacker
# writes the nibbles of `packed` (N / 64 blocks of 64 output rows) into nibbles_t [K, N / 64, 2,
# 32], where [k, block, h, j] is row block * 64 + h * 32 + j, input column k.
Unpacker = Callable[[torch.Tensor, torch.Tensor], None]


def _unpack_avx2(packed: torch.Tensor, nibbles_t: torch.Tensor) -> None:
    """A block as [2 halves, K, 16 bytes]: byte j of half h holds row h * 32 + j in its low
    nibble and row h * 32 + 16 + j in its high."""
    k, blocks = nibbles_t.shape[:2]
    by_column = packed.view(blocks, 2, k, 16).permute(2, 0, 1, 3)
    nibbles_t[..., :16].copy_(by_column & 15)
    nibbles_t[..., 16:].copy_(by_column >> 4)


def _unpack_avx512(packed: torch.Tensor, nibbles_t: torch.Tensor) -> None:
    """A block as [K, 32 bytes]: byte j holds row j in its low nibble and row 32 + j in its
    high."""
    k, blocks = nibbles_t.shape[:2]
    by_column = packed.view(blocks, k, 32).permute(1, 0, 2)
    nibbles_t[:, :, 0].copy_(by_column & 15)
    nibbles_t[:, :, 1].copy_(by_column >> 4)


@functools.cache
def _int4pack_unpacker() -> Unpacker | None:
    """The unpacker that reads back what torch packs on this machine (checked on a probe
    weight), or None: then nothing is unpacked (big prefills stay on the int4 kernel)."""
    rows, columns = 2 * _PACK_BLOCK_ROWS, 2 * GROUP_SIZE
    q = torch.randint(0, 16, (rows, columns), generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
    for unpack in (_unpack_avx2, _unpack_avx512):
        nibbles_t = torch.empty(columns, rows // _PACK_BLOCK_ROWS, 2, 32)
        try:
            unpack(packed, nibbles_t)
        except RuntimeError:  # not this layout's size
            continue
        if torch.equal(nibbles_t.view(columns, rows).t(), q.float()):
            return unpack
    return None


def _float32_workspace(numel: int) -> torch.Tensor:
    """A float32 buffer of this thread's, reused across layers and forwards: a fresh one per
    layer doubled the dequantizing time (page faults)."""
    buffer = getattr(_workspace, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = _workspace.buffer = torch.empty(numel)
    return buffer[:numel]


def _bf16_packing_available() -> bool:
    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


class Q8Embedding(torch.nn.Module):
    """Embedding lookup on Q8_0 rows as the GGUF file stores them (per 32 values: an fp16 scale,
    then 32 int8): each looked-up row is the file's exact values. `rows` [vocab, row bytes] may
    be a map of the file, so only the rows looked up become resident. `embed_scale`: Gemma
    multiplies looked-up rows."""

    def __init__(self, rows: torch.Tensor, embed_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.rows = rows
        self.num_embeddings = rows.shape[0]
        self.embedding_dim = rows.shape[1] // Q8_BLOCK_BYTES * GROUP_SIZE
        self.embed_scale = None if embed_scale is None else embed_scale.float().clone()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = q8_rows_as_float(self.rows[input_ids.reshape(-1)])
        rows = rows.view(*input_ids.shape, self.embedding_dim)
        return rows if self.embed_scale is None else rows * self.embed_scale

    def dequantized(self) -> torch.Tensor:
        """The whole table [vocab, dim] as float32, without embed_scale (exactness checks)."""
        scale, self.embed_scale = self.embed_scale, None
        try:
            return self.forward(torch.arange(self.num_embeddings))
        finally:
            self.embed_scale = scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, Q8_0 rows"


def q8_rows_as_float(rows: torch.Tensor) -> torch.Tensor:
    """Q8_0 rows [R, K / 32 * 34] (uint8) -> their values [R, K] float32, the file's exactly."""
    blocks = rows.reshape(-1, Q8_BLOCK_BYTES)
    scales = blocks[:, :2].contiguous().view(torch.float16).float()
    values = blocks[:, 2:].contiguous().view(torch.int8).float() * scales
    return values.view(rows.shape[0], -1)


class Bf16Embedding(torch.nn.Module):
    """Embedding lookup on a bf16 table (vocabularies of other GGUF types), rows as float32."""

    def __init__(self, table: torch.Tensor, embed_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.table = table.to(torch.bfloat16).contiguous()
        self.num_embeddings, self.embedding_dim = self.table.shape
        self.embed_scale = None if embed_scale is None else embed_scale.float().clone()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table[input_ids].float()
        return rows if self.embed_scale is None else rows * self.embed_scale

    def dequantized(self) -> torch.Tensor:
        return self.table.float()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bf16"


def add_fp16_copies(model: torch.nn.Module, min_rows: int) -> int:
    """An fp16 copy of every Int4Linear's weight, for prefill and decode steps of min_rows rows
    or more; returns how many weights were copied."""
    layers = [module for module in model.modules() if isinstance(module, Int4Linear)]
    for layer in layers:
        layer.add_fp16_copy(min_rows)
    return sum(layer.in_features * layer.out_features for layer in layers)


def has_int4_layers(model: torch.nn.Module) -> bool:
    """Whether the model was loaded with native 4-bit weights (some layer is an Int4Linear)."""
    return any(isinstance(module, Int4Linear) for module in model.modules())


def can_run_int4() -> bool:
    """Whether this torch has the CPU int4 kernels (2.5+ names them *_for_cpu)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def fuse_int4(linears: list[Int4Linear]) -> Int4Linear | None:
    """One layer computing the given layers' outputs side by side (same input, one kernel
    call); the given layers keep working as views of its weight, so no memory is added.
    None when a layer's rows do not fill whole blocks of torch's packing, they differ in input,
    or one has a bias (not needed by the models fused so far)."""
    if any(linear.bias is not None or not linear._unpackable() for linear in linears):
        return None
    if len({linear.in_features for linear in linears}) != 1:
        return None
    fused = Int4Linear.__new__(Int4Linear)
    torch.nn.Module.__init__(fused)
    fused.in_features = linears[0].in_features
    fused.out_features = sum(linear.out_features for linear in linears)
    fused.q4, fused.packed_weight = None, None
    q4_parts = [linear.q4 for linear in linears if linear.q4 is not None]
    torch_parts = [linear.packed_weight for linear in linears if linear.packed_weight is not None]
    if len(q4_parts) == len(linears):
        fused.q4 = Q4Weight.cat(q4_parts)
    else:
        fused.packed_weight = torch.cat(torch_parts)
        fused.scales_and_zeros = torch.cat([linear.scales_and_zeros for linear in linears], dim=1)
    fused.bias = None
    # fp16 copies stay the layers' own (one each, no second copy): concatenated outputs
    has_copies = all(linear.fp16_parts for linear in linears)
    fused.fp16_parts = [p for linear in linears for p in linear.fp16_parts] if has_copies else []
    fused.fp16_min_rows = max(linear.fp16_min_rows for linear in linears)
    start = 0
    for linear in linears:  # the separate layers now read the fused copy
        stop = start + linear.out_features
        if fused.q4 is not None:
            linear.q4 = fused.q4.rows(start, stop)
        elif fused.packed_weight is not None:
            linear.packed_weight = fused.packed_weight[start:stop]
        start = stop
    return fused
