"""decode_kernel.c's pieces of a Llama decode step give torch's: RMSNorm after the residual add,
SiLU x up (its own exp, at values far out too), and RoPE + the cache write + attention over a
left-padded cache (whole blocks of padding, columns past one score block)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serve_app.engine.decode_native import (
    AttentionShape,
    CacheColumns,
    add_rms_norm,
    decode_attention,
    silu_mul,
)
from serve_app.engine.q4_native import q4_kernel

pytestmark = pytest.mark.skipif(q4_kernel() is None, reason="the C kernels do not build here")


def test_add_rms_norm_adds_the_residual_then_normalizes() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden, delta = torch.randn(3, 70, generator=generator), torch.randn(3, 70, generator=generator)
    weight = torch.rand(70, generator=generator) + 0.5
    expected_hidden = hidden + delta
    normed = add_rms_norm(hidden, delta, weight, 1e-5)
    torch.testing.assert_close(hidden, expected_hidden)  # in place
    torch.testing.assert_close(normed, F.rms_norm(expected_hidden, (70,), weight, 1e-5))


def test_silu_mul_gives_torchs_out_to_large_values() -> None:
    generator = torch.Generator().manual_seed(1)
    gate_up = torch.randn(2, 2 * 203, generator=generator) * 4
    gate_up[0, :8] = torch.tensor([-200.0, -90.0, -30.0, -1e-3, 0.0, 30.0, 90.0, 200.0])
    gate, up = gate_up[:, :203], gate_up[:, 203:]
    torch.testing.assert_close(silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


def _rotated(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x [rows, heads, dim] by RoPE as transformers' rotate_half does it."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    sin = torch.cat([signed_sin[:, half:], signed_sin[:, half:]], dim=-1)  # unsigned again
    return x * cos.unsqueeze(1) + rotated_half * sin.unsqueeze(1)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 3), (9, 3)])
def test_attention_writes_the_column_and_attends_like_sdpa(heads: int, kv_heads: int) -> None:
    generator = torch.Generator().manual_seed(heads)
    rows, dim, capacity, column = 3, 16, 200, 149
    shape = AttentionShape(heads, kv_heads, dim, scale=dim**-0.5)
    assert shape.fits_kernel()
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, generator=generator)
    angles = torch.rand(rows, dim // 2, generator=generator) * 6
    cos = torch.cat([angles.cos(), angles.cos()], dim=1)
    signed_sin = torch.cat([-angles.sin(), angles.sin()], dim=1)
    keys = torch.randn(rows, kv_heads, capacity, dim, generator=generator) * 2
    values = torch.randn(rows, kv_heads, capacity, dim, generator=generator)
    past_the_column = keys[:, :, column + 1 :].clone()
    mask = torch.ones(rows, column + 1, dtype=torch.int64)
    mask[1, :100] = 0  # left padding: a whole score block of 64 and part of the next
    mask[2, :5] = 0
    expected_keys, expected_values = (
        keys[:, :, : column + 1].clone(),
        values[:, :, : column + 1].clone(),
    )
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=1)
    expected_keys[:, :, column] = _rotated(k.view(rows, kv_heads, dim), cos, signed_sin)
    expected_values[:, :, column] = v.view(rows, kv_heads, dim)
    expected = F.scaled_dot_product_attention(
        _rotated(q.view(rows, heads, dim), cos, signed_sin).unsqueeze(2),
        expected_keys,
        expected_values,
        attn_mask=mask.bool().view(rows, 1, 1, -1),
        scale=shape.scale,
        enable_gqa=True,
    ).reshape(rows, -1)
    got = decode_attention(qkv, shape, cos, signed_sin, CacheColumns(keys, values, column, mask))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(keys[:, :, : column + 1], expected_keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values[:, :, : column + 1], expected_values)
    assert torch.equal(keys[:, :, column + 1 :], past_the_column)  # nothing written past it


def test_attention_shapes_past_the_kernels_limits_stay_in_torch() -> None:
    assert not AttentionShape(32, 1, 64, 0.1).fits_kernel()  # 32 query heads per kv head
    assert not AttentionShape(4, 2, 12, 0.1).fits_kernel()  # head_dim not a multiple of 8
    assert not AttentionShape(4, 2, 512, 0.1).fits_kernel()
    assert not AttentionShape(6, 4, 64, 0.1).fits_kernel()
