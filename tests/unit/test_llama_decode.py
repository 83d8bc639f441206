"""The written-out Llama decode step gives the model's own forward: the same logits and the same
cache writes over a left-padded batch, step after step; fused int4 layers multiply like the
separate ones, which keep working as views of the fused weight."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from serve_app.engine import quantized_linear
from serve_app.engine.batch import cache_kv, growing_cache
from serve_app.engine.llama_decode import LlamaDecodeStep, supports_llama_decode
from serve_app.engine.q4_native import q4_kernel
from serve_app.engine.quantized_linear import Int4Linear, can_run_int4, fuse_int4
from tests.unit.conftest import tiny_llama_config


@pytest.fixture(scope="module")
def model() -> Any:
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=300, max_position_embeddings=256, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def _prefilled(model: Any, lengths: list[int]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """A left-padded batch of random prompts: its growing cache, mask and first tokens."""
    width = max(lengths)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (len(lengths), width), generator=generator)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, width - length :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache
        )
    return growing_cache(cache_kv(cache)), mask, out.logits[:, -1].argmax(-1, keepdim=True)


def test_steps_match_the_models_forward_over_a_left_padded_batch(model: Any) -> None:
    lengths = [7, 3, 11]
    reference_cache, mask, tokens = _prefilled(model, lengths)
    lean_cache, _, _ = _prefilled(model, lengths)
    step = LlamaDecodeStep(model)
    reference_tokens = lean_tokens = tokens
    for _ in range(6):
        mask = torch.cat([mask, mask.new_ones((len(lengths), 1))], dim=1)
        positions = mask.sum(1, keepdim=True) - 1
        with torch.no_grad():
            reference = model(
                input_ids=reference_tokens,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=reference_cache,
            ).logits[:, -1]
        lean = step(lean_tokens, positions, mask, lean_cache)
        torch.testing.assert_close(lean, reference, rtol=1e-4, atol=1e-4)
        reference_tokens = reference.argmax(-1, keepdim=True)
        lean_tokens = lean.argmax(-1, keepdim=True)
    for (ref_k, ref_v), (k, v) in zip(cache_kv(reference_cache), cache_kv(lean_cache), strict=True):
        torch.testing.assert_close(k, ref_k, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v, ref_v, rtol=1e-4, atol=1e-4)


def test_the_governor_hears_each_layer_and_the_end(model: Any) -> None:
    cache, mask, tokens = _prefilled(model, [4, 6])
    mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
    marks: list[int] = []
    LlamaDecodeStep(model)(
        tokens, mask.sum(1, keepdim=True) - 1, mask, cache, lambda: marks.append(1)
    )
    assert len(marks) == model.config.num_hidden_layers + 1


def test_only_plain_llama_models_are_supported(model: Any) -> None:
    assert supports_llama_decode(model)
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    gemma = Gemma3ForCausalLM(
        Gemma3TextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=100,
        )
    )
    assert not supports_llama_decode(gemma)
    biased = LlamaForCausalLM(tiny_llama_config(vocab_size=100, attention_bias=True))
    assert not supports_llama_decode(biased)


def _int4(rows: int, cols: int = 128, seed: int = 0) -> Int4Linear:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols), generator=generator)
    scales = torch.rand((rows, cols // 32), generator=generator) * 0.01
    zeros = torch.randn((rows, cols // 32), generator=generator) * 0.01
    return Int4Linear(q, scales, zeros)


def _weight_storage(layer: Int4Linear) -> int:
    return (layer.q4.nibbles if layer.q4 is not None else layer.packed_weight).data_ptr()


@pytest.mark.skipif(not can_run_int4(), reason="torch has no CPU int4 kernels")
def test_fused_int4_layers_multiply_like_the_separate_ones(int4_kernel: str) -> None:
    layers = [_int4(128, seed=1), _int4(64, seed=2), _int4(64, seed=3)]
    x = torch.randn(5, 128)
    separate = torch.cat([layer(x) for layer in layers], dim=1)
    fused = fuse_int4(layers)
    assert fused is not None and fused.out_features == 256 and int4_kernel in repr(fused)
    assert torch.equal(fused(x), separate)
    # the originals now read slices of the fused weight: same results, no copy of their own
    assert torch.equal(torch.cat([layer(x) for layer in layers], dim=1), separate)
    start = fused.q4.rows(128, 256).nibbles if fused.q4 is not None else fused.packed_weight[128:]
    assert _weight_storage(layers[1]) == start.data_ptr()


@pytest.mark.skipif(not can_run_int4(), reason="torch has no CPU int4 kernels")
def test_layers_off_the_packing_blocks_are_not_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's CPU packing interleaves 64 rows: 96 + 32 concatenated would mix two layers' rows
    monkeypatch.setattr(quantized_linear, "q4_kernel", lambda: None)
    assert fuse_int4([_int4(96), _int4(32)]) is None
    assert fuse_int4([_int4(64, cols=128), _int4(64, cols=64)]) is None


@pytest.mark.skipif(q4_kernel() is None, reason="q4_kernel.c does not build or run here")
def test_q4_kernel_layers_fuse_at_any_row_count() -> None:
    """q4_kernel.c keeps each output row's blocks together: any row counts concatenate."""
    layers = [_int4(96, seed=1), _int4(32, seed=2)]
    x = torch.randn(3, 128)
    separate = torch.cat([layer(x) for layer in layers], dim=1)
    fused = fuse_int4(layers)
    assert fused is not None and torch.equal(fused(x), separate)
    assert fuse_int4([_int4(64, cols=128), _int4(64, cols=64)]) is None  # inputs differ


@pytest.mark.skipif(q4_kernel() is None, reason="the C kernels do not build here")
def test_c_layers_give_the_torch_layers_past_the_caches_spare_columns(model: Any) -> None:
    """decode_kernel.c's layers (here: C between torch's float32 matmuls) against the torch ops,
    fed the same tokens for 80 steps: a row with over a score block of padding, and past the
    cache's spare columns (regrown in place at 64 + 70 / 8)."""
    lengths = [70, 3, 11]
    torch_cache, mask, tokens = _prefilled(model, lengths)
    c_cache, _, _ = _prefilled(model, lengths)
    in_torch, in_c = LlamaDecodeStep(model), LlamaDecodeStep(model)
    in_torch.in_c = False
    assert in_c.in_c
    for _ in range(80):
        mask = torch.cat([mask, mask.new_ones((len(lengths), 1))], dim=1)
        positions = mask.sum(1, keepdim=True) - 1
        expected = in_torch(tokens, positions, mask, torch_cache)
        got = in_c(tokens, positions, mask, c_cache)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        tokens = expected.argmax(-1, keepdim=True)
    for (ref_k, ref_v), (k, v) in zip(cache_kv(torch_cache), cache_kv(c_cache), strict=True):
        assert k.shape == ref_k.shape == (3, 2, 150, 16)
        torch.testing.assert_close(k, ref_k, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v, ref_v, rtol=1e-4, atol=1e-4)


class _Alone:
    """One request fed through the model's own forward with a cache of its own."""

    def __init__(self, model: Any, prompt: torch.Tensor) -> None:
        self.model, self.cache, self.length = model, DynamicCache(), int(prompt.shape[0])
        self.logits = self._forward(prompt[None], torch.arange(self.length)[None])

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(input_ids=ids, position_ids=positions, past_key_values=self.cache)
        return out.logits[0, -1]

    @property
    def token(self) -> int:
        return int(self.logits.argmax())

    def step(self) -> None:
        self.logits = self._forward(torch.tensor([[self.token]]), torch.tensor([[self.length]]))
        self.length += 1


def test_rows_join_and_leave_the_batch_in_place_under_the_c_layers(model: Any) -> None:
    """BatchCache rows that join (into spare rows, or by one copy when wider than the batch)
    and leave (the last row moved into the freed place, or the padding columns trimmed)
    between C decode steps: every row's logits stay those of its own forward alone."""
    from serve_app.engine.batch import BatchCache, GrowingLayer
    from serve_app.engine.scheduler import rows_after_leaving

    step = LlamaDecodeStep(model)
    assert step.in_c
    generator = torch.Generator().manual_seed(11)
    batch, rows = BatchCache(), []

    def join(length: int) -> None:
        alone = _Alone(model, torch.randint(3, 300, (length,), generator=generator))
        rows.append(alone)
        batch.append_rows(
            growing_cache(cache_kv(alone.cache)), torch.ones((1, length), dtype=torch.long)
        )

    def decode(steps: int) -> None:
        for _ in range(steps):
            tokens = torch.tensor([[alone.token] for alone in rows])
            positions = torch.tensor([[alone.length] for alone in rows])
            assert batch.cache is not None
            got = step(tokens, positions, batch.decode_mask(), batch.cache)
            for alone in rows:
                alone.step()
            torch.testing.assert_close(got, torch.stack([a.logits for a in rows]), **CLOSE)

    def leave(*leaving: int) -> None:
        keep = rows_after_leaving([row not in leaving for row in range(len(rows))])
        batch.keep_rows(keep)
        rows[:] = [rows[row] for row in keep]

    def layer0() -> GrowingLayer:
        assert batch.cache is not None
        return batch.cache.layers[0]  # type: ignore[return-value]

    join(9)
    buffer = layer0()._key_buffer
    join(5)  # narrower than the batch: written into a spare row
    decode(3)
    join(4)
    assert layer0()._key_buffer is buffer
    decode(2)
    join(30)  # wider than the batch (14 columns): one copy of all, left-padded
    assert layer0()._key_buffer is not buffer
    decode(3)
    buffer = layer0()._key_buffer
    leave(0)  # the last row (30 tokens) moves into row 0
    assert rows[0].length == 33 and layer0()._key_buffer is buffer
    decode(2)
    leave(0)  # the long row leaves: 18 all-padding columns on the left, trimmed (one copy)
    assert layer0()._key_buffer is not buffer and batch.attention_mask is not None
    assert bool(batch.attention_mask[:, 0].any())
    decode(3)


CLOSE = {"rtol": 1e-4, "atol": 1e-4}


@pytest.mark.skipif(q4_kernel() is None, reason="the C kernels do not build here")
@pytest.mark.parametrize("prefix", [0, 9])
def test_c_prefill_gives_the_models_forward(model: Any, prefix: int) -> None:
    """Left-padded prompts (after a cached prefix of `prefix` tokens, itself left-padded in the
    cache) through LlamaDecodeStep.prefill: the last tokens' logits and every cache column the
    model's own forward gives; the padded columns are never attended to."""
    generator = torch.Generator().manual_seed(5)
    lengths, width = [6, 2, 11], 11
    ids = torch.randint(3, 300, (3, prefix + width), generator=generator)
    mask = torch.ones((3, prefix + width), dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, prefix : prefix + width - length] = 0  # the rest's left padding
    mask[1, : prefix // 2] = 0  # a shorter cached prefix, left-padded too
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    reference, c_cache = DynamicCache(), LlamaDecodeStep(model).empty_cache(3)
    step = LlamaDecodeStep(model)
    if prefix:
        with torch.no_grad():
            model(
                input_ids=ids[:, :prefix],
                attention_mask=mask[:, :prefix],
                position_ids=positions[:, :prefix],
                past_key_values=reference,
            )
        c_cache = growing_cache(cache_kv(reference))
    with torch.no_grad():
        expected = model(
            input_ids=ids[:, prefix:],
            attention_mask=mask,
            position_ids=positions[:, prefix:],
            past_key_values=reference,
        ).logits[:, -1]
    got = step.prefill(ids[:, prefix:], positions[:, prefix:], mask, c_cache)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    real = mask.bool()
    for (ref_k, ref_v), (k, v) in zip(cache_kv(reference), cache_kv(c_cache), strict=True):
        assert k.shape == ref_k.shape
        torch.testing.assert_close(
            k[real.unsqueeze(1).expand_as(k[..., 0])],
            ref_k[real.unsqueeze(1).expand_as(ref_k[..., 0])],
            rtol=1e-4,
            atol=1e-4,
        )
        torch.testing.assert_close(
            v[real.unsqueeze(1).expand_as(v[..., 0])],
            ref_v[real.unsqueeze(1).expand_as(ref_v[..., 0])],
            rtol=1e-4,
            atol=1e-4,
        )


@pytest.mark.skipif(q4_kernel() is None, reason="q4_kernel.c does not build or run here")
def test_decode_rows_leaves_big_forwards_to_the_unpacked_weight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A C prefill of Q4_DEQUANTIZED_MIN_ROWS tokens or more multiplies by the weight unpacked
    to float32 (as fast there), fewer through the int4 kernel, also past torch's kernel's
    threshold (DEQUANTIZED_MIN_ROWS), in decode_rows and forward: the same values either way."""
    layer, calls = _int4(64), []
    kernel = quantized_linear._int4_matmul

    def counting(linear: Int4Linear, rows: torch.Tensor) -> torch.Tensor:
        calls.append(int(rows.shape[0]))
        return kernel(linear, rows)

    monkeypatch.setattr(quantized_linear, "_int4_matmul", counting)
    x = torch.randn(quantized_linear.Q4_DEQUANTIZED_MIN_ROWS, 128)
    expected = x.double() @ layer.dequantized().double().t()
    torch.testing.assert_close(layer.decode_rows(x).double(), expected, rtol=1e-4, atol=1e-4)
    assert calls == []
    layer.decode_rows(x[:3])
    assert calls == [3]
    past_torch = x[: quantized_linear.DEQUANTIZED_MIN_ROWS]
    layer.decode_rows(past_torch)
    layer(past_torch)
    torch_threshold = quantized_linear.DEQUANTIZED_MIN_ROWS
    assert calls == [3, torch_threshold, torch_threshold]
