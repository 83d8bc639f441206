"""The Python side of decode_kernel.c: the written-out Llama step's RMSNorm, SiLU x up,
attention with its cache write, and whole decoder layers on 4-bit weights (`NativeLayer`), for
llama_decode.py's decode steps and prefills.

Each function takes float32 rows [M, D] and calls the library q4_native.py builds; where it did
not build (`q4_kernel()` is None) llama_decode.py keeps its torch ops.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from serve_app.engine.q4_native import Q4Weight, checked, q4_kernel

MAX_GROUP = 16  # decode_kernel.c's limits: query heads per key/value head,
MAX_HEAD_DIM = 256  # and head size (a multiple of 8)


def _kernel() -> Any:
    kernel = q4_kernel()
    assert kernel is not None, "decode_kernel.c is not built here"
    return kernel


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, weight.shape, weight, eps) for float32 rows [M, D] in one C call (torch's
    takes ~30 us a call at one row; this ~4)."""
    kernel = q4_kernel()
    if kernel is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() != 2:
        return torch.nn.functional.rms_norm(x, weight.shape, weight, eps)
    rows, w = x.contiguous(), weight.contiguous()
    y = torch.empty_like(rows)
    kernel.rms_norm(rows.data_ptr(), rows.shape[0], rows.shape[1], w.data_ptr(), eps, y.data_ptr())
    return y


def add_rms_norm(
    hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """hidden += delta in place (the residual add), then rms_norm(hidden); all contiguous
    float32 [M, D]."""
    normed = torch.empty_like(hidden)
    _kernel().add_rms_norm(
        hidden.data_ptr(),
        delta.contiguous().data_ptr(),
        hidden.shape[0],
        hidden.shape[1],
        weight.data_ptr(),
        eps,
        normed.data_ptr(),
    )
    return normed


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [M, 2 I] (gate, up side by side) -> [M, I]."""
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, inter)
    _kernel().silu_mul(gate_up.contiguous().data_ptr(), rows, inter, out.data_ptr())
    return out


class AttentionShape:
    """A layer's attention sizes as decode_kernel.c takes them."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, scale: float) -> None:
        self.heads, self.kv_heads, self.head_dim, self.scale = heads, kv_heads, head_dim, scale

    def fits_kernel(self) -> bool:
        return (
            self.heads % self.kv_heads == 0
            and self.heads // self.kv_heads <= MAX_GROUP
            and self.head_dim <= MAX_HEAD_DIM
            and self.head_dim % 8 == 0
        )


class CacheColumns:
    """Where a forward writes one layer's new keys/values: the cache's buffers [sequences,
    kv_heads, capacity, head_dim] (contiguous float32), from `first_column` on, `tokens` new
    tokens per sequence (1 in a decode step); the attention mask [sequences, first_column +
    tokens] (int64) says which columns each sequence attends to (a token also sees only the
    columns before its own)."""

    __slots__ = ("keys", "values", "first_column", "tokens", "mask")

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        first_column: int,
        mask: torch.Tensor,
        tokens: int = 1,
    ) -> None:
        self.keys, self.values, self.mask = keys, values, mask
        self.first_column, self.tokens = first_column, tokens

    def arguments(self) -> tuple[int, int, int, int, int]:
        """keys, values, capacity, first column, mask: the C functions' last arguments."""
        keys, values, mask = self.keys.data_ptr(), self.values.data_ptr(), self.mask.data_ptr()
        return keys, values, self.keys.shape[2], self.first_column, mask


def decode_attention(
    qkv: torch.Tensor,
    shape: AttentionShape,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    cache: CacheColumns,
) -> torch.Tensor:
    """Rotates q and k of qkv [M, (heads + 2 kv_heads) head_dim] (M = sequences x tokens),
    writes k and v into the cache columns, attends: [M, heads head_dim]."""
    rows = qkv.shape[0]
    out = torch.empty(rows, shape.heads * shape.head_dim)
    status = _kernel().decode_attention(
        qkv.contiguous().data_ptr(),
        rows,
        cache.tokens,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
        shape.scale,
        cos.data_ptr(),
        signed_sin.data_ptr(),
        *cache.arguments(),
        out.data_ptr(),
    )
    return checked(status, out)


class _Q4Weight(ctypes.Structure):
    _fields_ = [
        ("nibbles", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("m", ctypes.c_void_p),
        ("out_features", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
    ]


class _LlamaLayer(ctypes.Structure):
    _fields_ = [
        ("qkv", _Q4Weight),
        ("o", _Q4Weight),
        ("gate_up", _Q4Weight),
        ("down", _Q4Weight),
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("input_eps", ctypes.c_float),
        ("post_eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
    ]


def _weight_struct(weight: Q4Weight) -> _Q4Weight:
    return _Q4Weight(
        weight.nibbles.data_ptr(),
        weight.d.data_ptr(),
        weight.m.data_ptr(),
        weight.out_features,
        weight.in_features,
    )


class NativeLayer:
    """One decoder layer whose four matmuls are q4_kernel.c's (q/k/v and gate/up fused): a
    forward's layer in one C call, hidden [M, D] updated in place."""

    def __init__(
        self,
        weights: dict[str, Q4Weight],
        norms: tuple[tuple[torch.Tensor, float], tuple[torch.Tensor, float]],
        shape: AttentionShape,
    ) -> None:
        (input_norm, input_eps), (post_norm, post_eps) = norms
        self._tensors = (weights, input_norm, post_norm)  # the struct points into them
        self._struct = _LlamaLayer(
            _weight_struct(weights["qkv"]),
            _weight_struct(weights["o"]),
            _weight_struct(weights["gate_up"]),
            _weight_struct(weights["down"]),
            input_norm.data_ptr(),
            post_norm.data_ptr(),
            input_eps,
            post_eps,
            shape.scale,
            shape.heads,
            shape.kv_heads,
            shape.head_dim,
        )
        self._pointer = ctypes.addressof(self._struct)

    def __call__(
        self, hidden: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, cache: CacheColumns
    ) -> torch.Tensor:
        status = _kernel().llama_layer_decode(
            self._pointer,
            hidden.data_ptr(),
            hidden.shape[0],
            cache.tokens,
            cos.data_ptr(),
            signed_sin.data_ptr(),
            *cache.arguments(),
        )
        return checked(status, hidden)
