"""q4_kernel.c is built once per machine into the kernel cache, and where it cannot be built or
run (no compiler, no AVX2, or SERVE_APP_INT4_KERNEL=torch) int4 layers keep torch's kernel."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from serve_app.engine import q4_native
from serve_app.engine.decode_native import rms_norm
from serve_app.engine.q4_native import KERNEL_ENV, Q4Weight, q4_kernel


@pytest.fixture
def fresh_kernel() -> Iterator[None]:
    """q4_kernel() decides again in the test, and again after it."""
    q4_kernel.cache_clear()
    yield
    q4_kernel.cache_clear()


def test_the_environment_can_keep_torchs_kernel(
    fresh_kernel: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KERNEL_ENV, "torch")
    assert q4_kernel() is None


def test_without_a_compiler_int4_layers_keep_torchs_kernel(
    fresh_kernel: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(q4_native, "_cpu_has", lambda *flags: True)
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert q4_kernel() is None
    assert "no C compiler" in caplog.text


@pytest.mark.skipif(q4_kernel() is None, reason="q4_kernel.c does not build or run here")
def test_the_library_is_built_once_per_source_into_the_kernel_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SERVE_APP_KERNEL_DIR", str(tmp_path))
    compiler = "cc"
    first = q4_native._built_library(compiler)
    built_at = first.stat().st_mtime_ns
    assert first.parent == tmp_path and first.name.startswith("q4_kernel-")
    assert q4_native._built_library(compiler) == first
    assert first.stat().st_mtime_ns == built_at  # not compiled again
    assert [p.suffix for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


@pytest.mark.skipif(q4_kernel() is None, reason="q4_kernel.c does not build or run here")
def test_the_kernel_multiplies_by_the_exact_weight_with_16_bit_activations() -> None:
    """A row whose blocks hold one large value beside small ones (activation outliers): 16-bit
    steps (50 / 32767) keep the small values' part of the products to a few percent; 8-bit
    steps (50 / 127) would round every small value to 0 and lose all of it."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (40, 96), generator=generator)
    scales = torch.rand(40, 3, generator=generator) * 0.02 + 0.001
    zeros = torch.randn(40, 3, generator=generator) * 0.05
    weight = Q4Weight.from_groups(q, scales, zeros)
    exact = (q.float() - 8).view(40, 3, 32) * scales.unsqueeze(-1) + zeros.unsqueeze(-1)
    dequantized = weight.dequantize_into(torch.empty(40 * 96))
    torch.testing.assert_close(dequantized, exact.view(40, 96), rtol=0, atol=1e-6)
    x = torch.randn(7, 96, generator=generator) * 0.01
    x[:, ::32] = 50.0  # one outlier per block
    expected = x.double() @ exact.view(40, 96).double().t()
    got = weight.matmul(x)
    small_part = (x.clone().index_fill_(1, torch.arange(0, 96, 32), 0.0)).double()
    small = small_part @ exact.view(40, 96).double().t()
    assert (got.double() - expected).abs().max() < 0.1 * small.abs().max()


@pytest.mark.skipif(q4_kernel() is None, reason="q4_kernel.c does not build or run here")
@pytest.mark.parametrize("threads", [1, 2])
def test_the_float_path_covers_every_tile_remainder(threads: int) -> None:
    """From 8 rows on the kernel multiplies tiles of 4 activation rows x 3 output rows, passes of
    64 rows over each thread's decoded weights: every leftover row and output, and rows past a
    pass, get the exact weight's product (to float32 accumulation)."""
    generator = torch.Generator().manual_seed(1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for outputs in (1, 2, 4, 5, 96):
            q = torch.randint(0, 16, (outputs, 96), generator=generator)
            scales = torch.rand(outputs, 3, generator=generator) * 0.02 + 0.001
            zeros = torch.randn(outputs, 3, generator=generator) * 0.05
            weight = Q4Weight.from_groups(q, scales, zeros)
            exact = weight.dequantize_into(torch.empty(outputs * 96)).view(outputs, 96)
            for rows in (8, 9, 10, 11, 64, 65, 130):
                x = torch.randn(rows, 96, generator=generator)
                expected = x.double() @ exact.double().t()
                got = weight.matmul(x).double()
                assert (got - expected).abs().max() < 1e-5 * expected.abs().max(), (outputs, rows)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(q4_kernel() is None, reason="q4_kernel.c does not build or run here")
@pytest.mark.parametrize("shape", [(1, 576), (3, 70), (16, 64)])
def test_rms_norm_gives_torchs_rms_norm(shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(shape[1])
    x = torch.randn(*shape, generator=generator) * 3
    weight = torch.randn(shape[1], generator=generator)
    expected = torch.nn.functional.rms_norm(x, weight.shape, weight, 1e-5)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), expected, atol=1e-6, rtol=1e-5)
    half = x.bfloat16()  # other dtypes: torch's own
    torch.testing.assert_close(
        rms_norm(half, weight.bfloat16(), 1e-5),
        torch.nn.functional.rms_norm(half, weight.shape, weight.bfloat16(), 1e-5),
    )
