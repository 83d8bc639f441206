"""GGUF weights served natively: the 4-bit groups reproduce the file's values, the kernels'
layers multiply like the dequantized weights, and a tiny Llama written as GGUF (Q4_0, Q4_1,
Q5_0, Q8_0 tensors) loaded natively gives the logits of transformers' dequantized load."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType, GGUFWriter, dequantize, quantize
from transformers import AutoConfig, AutoModelForCausalLM

from serve_app.config import ModelConfig
from serve_app.engine import q4_native, quantized_linear
from serve_app.engine.gguf_weights import int4_groups, load_native_model, write_index
from serve_app.engine.q4_native import q4_kernel
from serve_app.engine.quantized_linear import (
    DEQUANTIZED_MIN_ROWS,
    Bf16Linear,
    Fp16Linear,
    Int4Linear,
    Q8Embedding,
    Q8Linear,
    can_run_int4,
)
from serve_app.model_store import is_native_folder, wants_native_weights

pytestmark = pytest.mark.skipif(not can_run_int4(), reason="torch has no CPU int4 kernels")


def _kernel_reference(layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    """What the layer's kernel computes for x, from its dequantized weight: q4_kernel.c, under
    8 rows, quantizes each row's blocks of 32 to int16 (scale max|x| / 32767) and from 8 rows on
    takes them as they are; torch's kernel rounds the activations to bf16. The products are then
    exact to float32 accumulation."""
    num_rows = x.reshape(-1, x.shape[-1]).shape[0]
    if layer.q4 is None:
        x = x.bfloat16().float()
    elif num_rows < 8:
        blocks = x.reshape(*x.shape[:-1], -1, 32)
        scale = blocks.abs().amax(dim=-1, keepdim=True) / 32767
        # As q4_kernel.c rounds (lrintf of x times the scale's reciprocal): dividing instead
        # differs in the last bit now and then, a whole step at a tie (a flaky mismatch).
        inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        steps = (blocks * inverse).round()
        x = (steps * scale).reshape(x.shape)
    reference = x @ layer.dequantized().t()
    return reference if layer.bias is None else reference + layer.bias


def _assert_kernel_result(layer: Int4Linear, x: torch.Tensor, got: torch.Tensor) -> None:
    """got is the layer's kernel's result for x: to float32 accumulation for q4_kernel.c
    (float32 out), to bf16 rounding for torch's (bf16 out)."""
    tolerance = 1e-4 if layer.q4 is not None else 0.02
    torch.testing.assert_close(got, _kernel_reference(layer, x), atol=tolerance, rtol=tolerance)


def _q4k_blocks(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random Q4_K rows (gguf cannot quantize to Q4_K): any bytes are a valid block once its
    two fp16 factors are finite."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    factors = rng.uniform(0.001, 0.02, (rows, cols // 256, 2)).astype(np.float16)
    blocks[..., :4] = factors.view(np.uint8).reshape(rows, cols // 256, 4)
    return blocks.reshape(rows, -1)


def _quantized(qtype: T, rows: int = 48, cols: int = 256) -> np.ndarray:
    if qtype == T.Q4_K:
        return _q4k_blocks(rows, cols)
    weight = np.random.default_rng(1).normal(0, 0.05, (rows, cols)).astype(np.float32)
    weight[:, :32] += 0.1  # blocks whose values are not centred on 0 (Q4_1's min matters)
    return quantize(weight, qtype)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K])
def test_int4_groups_reproduce_the_files_values(qtype: T) -> None:
    raw = _quantized(qtype)
    q, scales, zeros = int4_groups(raw, qtype)
    assert q.min() >= 0 and q.max() <= 15
    groups = np.repeat(scales, 32, axis=1), np.repeat(zeros, 32, axis=1)
    rebuilt = (q.astype(np.float32) - 8) * groups[0] + groups[1]
    reference = dequantize(raw, qtype)
    assert rebuilt.shape == reference.shape
    np.testing.assert_allclose(rebuilt, reference, rtol=0, atol=1e-6 * np.abs(reference).max())


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K])
def test_int4_linear_multiplies_like_the_dequantized_weight(qtype: T, int4_kernel: str) -> None:
    raw = _quantized(qtype)
    q, scales, zeros = (torch.from_numpy(a.astype(np.float32)) for a in int4_groups(raw, qtype))
    layer = Int4Linear(q, scales, zeros)
    assert int4_kernel in repr(layer)
    reference = torch.from_numpy(dequantize(raw, qtype))
    # torch's kernel: the file's values but for bf16 scales and zeros; q4_kernel.c: float32
    # factors, the file's values to float32 rounding.
    tolerance = 1e-6 if layer.q4 is not None else 0.01
    assert (layer.dequantized() - reference).abs().max() <= tolerance * reference.abs().max()
    for rows in (1, 2, 3, 5, 15):  # the 16-bit path (1-7 rows; 4-row tiles), the float one
        x = torch.randn(1 if rows < 8 else 3, rows, reference.shape[1])
        expected = x @ reference.t()
        got = layer(x)
        assert got.shape == (*x.shape[:2], reference.shape[0]) and got.dtype == torch.float32
        assert (got - expected).abs().max() <= 0.02 * expected.abs().max()
        _assert_kernel_result(layer, x, got)


def _int4_layer(rows: int, cols: int, seed: int = 0) -> Int4Linear:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols), generator=generator)
    scales = torch.rand(rows, cols // 32, generator=generator) * 0.02 + 0.001
    zeros = torch.randn(rows, cols // 32, generator=generator) * 0.05
    return Int4Linear(q, scales, zeros, bias=torch.randn(rows, generator=generator))


def _counting_kernel(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of each int4 kernel call from now on."""
    calls: list[int] = []
    kernel = quantized_linear._int4_matmul

    def counting_kernel(layer: Int4Linear, rows: torch.Tensor) -> torch.Tensor:
        calls.append(int(rows.shape[0]))
        return kernel(layer, rows)

    monkeypatch.setattr(quantized_linear, "_int4_matmul", counting_kernel)
    return calls


@pytest.mark.parametrize("shape", [(64, 32), (192, 96), (1536, 576)])
def test_unpacked_float32_weight_is_the_kernels_own(
    shape: tuple[int, int], int4_kernel: str
) -> None:
    """The prefill path reads the kernel's packed layout back: every value must be the one the
    kernel multiplies by (a wrong nibble order or row interleave would move whole rows)."""
    layer = _int4_layer(*shape)
    assert torch.equal(layer._float32_weight_t().t(), layer.dequantized())


_UNPACK_PROBE = """
import torch
from serve_app.engine import quantized_linear
from tests.unit.test_native_weights import _int4_layer
quantized_linear.q4_kernel = lambda: None  # torch's int4 packing
layer = _int4_layer(192, 96)
assert layer._unpackable(), torch.backends.cpu.get_cpu_capability()
assert torch.equal(layer._float32_weight_t().t(), layer.dequantized())
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("capability", ["AVX2", "AVX512"])
def test_torch_int4_weights_unpack_under_each_instruction_set_torch_packs_for(
    capability: str,
) -> None:
    """torch packs int4 weights in another layout for AVX-512 than for AVX2 (an AVX-512 Xeon
    failed the exactness checks above while only the AVX2 layout was known)."""
    levels, here = ["AVX2", "AVX512"], torch.backends.cpu.get_cpu_capability()
    if here not in levels or levels.index(here) < levels.index(capability):
        pytest.skip(f"this CPU runs torch's {here} kernels")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.lower(), "PYTHONPATH": str(root)}
    probe = subprocess.run(
        [sys.executable, "-c", _UNPACK_PROBE],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == capability


def test_many_rows_multiply_through_the_float32_weight_few_through_the_kernel(
    monkeypatch: pytest.MonkeyPatch, int4_kernel: str
) -> None:
    layer = _int4_layer(128, 64)
    weight = layer.dequantized()
    calls = _counting_kernel(monkeypatch)
    many = torch.randn(2, layer.dequantized_min_rows(), 64)
    got = layer(many)
    assert calls == []  # float32 activations: the exact products, no bf16 rounding
    torch.testing.assert_close(got, many @ weight.t() + layer.bias, atol=1e-5, rtol=1e-5)
    few = torch.randn(3, 64)
    _assert_kernel_result(layer, few, layer(few))
    assert calls == [3]


def test_rows_not_in_whole_packing_blocks_stay_on_the_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(quantized_linear, "q4_kernel", lambda: None)  # torch's packing
    layer = _int4_layer(96, 64)  # the last 32 rows are a partial block of the packing
    calls = _counting_kernel(monkeypatch)
    x = torch.randn(DEQUANTIZED_MIN_ROWS, 64)
    torch.testing.assert_close(
        layer(x), x.bfloat16().float() @ layer.dequantized().t() + layer.bias, atol=0.02, rtol=0.02
    )
    assert calls == [DEQUANTIZED_MIN_ROWS]


@pytest.mark.parametrize("shape", [(128, 64), (96, 64)])  # whole packing blocks, or not
def test_an_fp16_copy_takes_prefill_and_decode_steps_from_its_min_rows(
    shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch, int4_kernel: str
) -> None:
    layer = _int4_layer(*shape)
    weight = layer.dequantized()
    layer.add_fp16_copy(min_rows=4)
    calls = _counting_kernel(monkeypatch)

    def by_copy(x: torch.Tensor) -> torch.Tensor:  # the kernel's values rounded to fp16
        return x @ weight.half().float().t() + layer.bias

    few = torch.randn(3, shape[1])
    _assert_kernel_result(layer, few, layer(few, decode=True))
    assert calls == [3]  # a decode step under min_rows: the int4 kernel
    assert torch.equal(layer.decode_rows(few), layer(few, decode=True))  # the step's fast path
    del calls[1:]
    torch.testing.assert_close(layer(few), by_copy(few), atol=1e-4, rtol=1e-4)  # prefill
    for num_rows in (4, layer.dequantized_min_rows()):  # the copy wins over the unpacking too
        many = torch.randn(num_rows, shape[1])
        torch.testing.assert_close(layer(many, decode=True), by_copy(many), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer(many), by_copy(many), atol=1e-4, rtol=1e-4)
    assert calls == [3]
    assert "fp16 copy from 4 rows" in repr(layer)


def test_a_fused_layer_multiplies_by_its_parts_fp16_copies(int4_kernel: str) -> None:
    parts = [_int4_layer(128, 64, seed=1), _int4_layer(64, 64, seed=2)]
    for part in parts:
        part.bias = None  # fuse_int4 takes layers without bias
        part.add_fp16_copy(min_rows=2)
    fused = quantized_linear.fuse_int4(parts)
    assert fused is not None
    assert fused.fp16_parts == [parts[0].fp16_parts[0], parts[1].fp16_parts[0]]  # no new copy
    x = torch.randn(5, 64)
    torch.testing.assert_close(fused(x), torch.cat([parts[0](x), parts[1](x)], dim=1))
    plain = _int4_layer(64, 64, seed=3)
    plain.bias = None
    without = quantized_linear.fuse_int4([plain, parts[1]])
    assert without is not None and without.fp16_parts == []  # one part has no copy: none


@pytest.mark.skipif(q4_kernel() is None, reason="q4_kernel.c does not build or run here")
def test_q8_head_multiplies_by_the_files_rows_exactly() -> None:
    """The tied head on Q8_0 rows: its weight is the file's values (no fp16 rounding), and its
    logits are those products to float32 accumulation and 16-bit activation steps, for one row
    (a decode step), a 4-row tile and a remainder, and from 8 rows on through the float path
    (80 outputs: a remainder of its 3-output tiles; 65 rows: past one 64-row pass)."""
    weight = np.random.default_rng(2).normal(0, 0.05, (80, 96)).astype(np.float32)
    raw = quantize(weight, T.Q8_0)
    head = Q8Linear(torch.from_numpy(raw))
    reference = torch.from_numpy(dequantize(raw, T.Q8_0))
    assert torch.equal(head.dequantized(), reference)
    for rows in (1, 4, 7, 9, 16, 65):
        x = torch.randn(rows, 96)
        got = head(x)
        assert got.shape == (rows, 80) and got.dtype == torch.float32
        torch.testing.assert_close(got, x @ reference.t(), atol=1e-4, rtol=1e-4)


def test_bf16_linear_multiplies_like_its_weight_rounded_to_bf16() -> None:
    torch.manual_seed(0)
    weight, bias = torch.randn(40, 64), torch.randn(40)
    layer = Bf16Linear(weight, bias)
    assert torch.equal(layer.dequantized(), weight.bfloat16().float())
    x = torch.randn(2, 3, 64)
    got = layer(x)
    assert got.shape == (2, 3, 40) and got.dtype == torch.float32
    # bf16 weights and activations, float32 accumulation, over 64 products
    torch.testing.assert_close(got, x @ weight.t() + bias, atol=0.1, rtol=0.02)


def test_fp16_head_gives_float32_logits_of_its_fp16_weight() -> None:
    """Logits are compared with each other: near-ties closer than bf16's step (0.06 at ~16)
    must keep their order. The fp16 head's logits are its weight's products to float32
    rounding; a bf16 matmul's output is rounded to bf16 (this check fails for Bf16Linear)."""
    torch.manual_seed(0)
    weight, bias = torch.randn(300, 576) * 0.2, torch.randn(300)
    head = Fp16Linear(weight, bias)
    assert torch.equal(head.dequantized(), weight.half().float())
    x = torch.randn(2, 3, 576)
    got = head(x)
    assert got.shape == (2, 3, 300) and got.dtype == torch.float32
    exact = (x.double() @ weight.half().double().t() + bias.double()).float()
    assert float(exact.abs().max()) > 16  # logits where bf16's step is 0.125
    assert float((got - exact).abs().max()) <= 1e-3


def test_q8_embedding_looks_up_the_files_exact_values() -> None:
    weight = np.random.default_rng(2).normal(0, 0.5, (50, 96)).astype(np.float32)
    raw = quantize(weight, T.Q8_0)  # [50, 3 blocks x 34 bytes]
    lookup = Q8Embedding(torch.from_numpy(raw), embed_scale=torch.tensor(2.0))
    assert (lookup.num_embeddings, lookup.embedding_dim) == (50, 96)
    ids = torch.tensor([[3, 49, 3], [0, 7, 11]])
    expected = 2 * torch.from_numpy(dequantize(raw, T.Q8_0))[ids]
    assert torch.equal(lookup(ids), expected)


# ---- a tiny Llama as a GGUF file -------------------------------------------------------

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 96
LINEAR_TYPES = {
    "attn_q": T.Q4_0,
    "attn_k": T.Q4_1,
    "attn_v": T.Q8_0,
    "attn_output": T.Q4_1,
    "ffn_gate": T.Q5_0,
    "ffn_up": T.Q4_0,
    "ffn_down": T.Q4_1,
}
SHAPES = {
    "attn_q": (HIDDEN, HIDDEN),
    "attn_k": (HIDDEN // 2, HIDDEN),
    "attn_v": (HIDDEN // 2, HIDDEN),
    "attn_output": (HIDDEN, HIDDEN),
    "ffn_gate": (FFN, HIDDEN),
    "ffn_up": (FFN, HIDDEN),
    "ffn_down": (HIDDEN, FFN),
}


def write_tiny_gguf(
    path: Path, head: T | None = None, linear_types: dict[str, T] = LINEAR_TYPES
) -> None:
    """`head`: the type of an untied output layer (none: the head is tied to token_embd)."""
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)

    def add(name: str, values: np.ndarray, qtype: T) -> None:
        if qtype == T.F32:
            writer.add_tensor(name, values.astype(np.float32))
        else:
            writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)

    add("token_embd.weight", rng.normal(0, 0.5, (VOCAB, HIDDEN)).astype(np.float32), T.Q8_0)
    add("output_norm.weight", rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32), T.F32)
    if head is not None:
        add("output.weight", rng.normal(0, 0.5, (VOCAB, HIDDEN)).astype(np.float32), head)
    for layer in range(LAYERS):
        for name, qtype in linear_types.items():
            weight = rng.normal(0, 0.2, SHAPES[name]).astype(np.float32)
            add(f"blk.{layer}.{name}.weight", weight, qtype)
        for norm in ("attn_norm", "ffn_norm"):
            add(f"blk.{layer}.{norm}.weight", rng.uniform(0.5, 1.5, HIDDEN), T.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def native_folder(gguf_path: Path, folder: Path) -> Path:
    """What model_store's native preparation writes, less the tokenizer."""
    AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(folder)
    write_index(gguf_path, folder)
    return folder


def test_an_untied_head_is_fp16_too(tmp_path: Path) -> None:
    gguf_path = tmp_path / "untied.gguf"
    write_tiny_gguf(gguf_path, head=T.Q4_0)
    native, report = load_native_model(
        native_folder(gguf_path, tmp_path / "native"), AutoModelForCausalLM
    )
    assert report.forms["Q4_0->fp16 head"] == 1 and "Q8_0->fp16 tied head" not in report.forms
    assert isinstance(native.lm_head, Fp16Linear)
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    assert not reference.config.tie_word_embeddings
    expected = reference.lm_head.weight.detach()
    # fp16 rounding to nearest: at most half a step, 2^-11 of the largest value
    error = float((native.lm_head.dequantized() - expected).abs().max())
    assert 0 < error <= float(expected.abs().max()) * 2**-11


def test_native_load_gives_transformers_dequantized_logits(tiny_gguf: Path, tmp_path: Path) -> None:
    folder = native_folder(tiny_gguf, tmp_path / "native")
    assert is_native_folder(folder)
    native, report = load_native_model(folder, AutoModelForCausalLM)
    tied_head = "Q8_0 rows tied head" if q4_kernel() is not None else "fp16 tied head"
    assert report.forms == {
        "Q8_0->Q8_0 rows embedding": 1,
        f"Q8_0->{tied_head}": 1,
        "Q4_0->int4": 2 * LAYERS,
        "Q4_1->int4": 3 * LAYERS,
        "Q8_0->bf16": LAYERS,
        "Q5_0->bf16": LAYERS,
        "F32->float32": 2 * LAYERS + 1,
    }
    assert isinstance(native.model.layers[0].self_attn.q_proj, Int4Linear)
    assert isinstance(native.lm_head, Q8Linear if q4_kernel() is not None else Fp16Linear)
    assert isinstance(native.model.layers[0].mlp.gate_proj, Bf16Linear)  # Q5_0
    assert isinstance(native.get_input_embeddings(), Q8Embedding)
    if isinstance(native.lm_head, Q8Linear):  # the lookup's own rows: no second copy
        assert native.lm_head.rows is native.get_input_embeddings().rows
    assert not any(p.device.type == "meta" for p in native.parameters())

    reference = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, native(input_ids=ids).logits
    # q/k rows in the order transformers un-permutes them to: a wrong order changes attention.
    p, q = torch.log_softmax(expected, -1), torch.log_softmax(got, -1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert float(kl.mean()) < 0.01, float(kl.mean())
    agreement = (expected.argmax(-1) == got.argmax(-1)).float().mean()
    assert agreement >= 0.9


def _prefilled_caches(native: Any, ids: torch.Tensor, count: int) -> list[Any]:
    """`count` growing caches, each holding the model's own prefill of ids."""
    from transformers import DynamicCache

    from serve_app.engine.batch import cache_kv, growing_cache

    caches = []
    for _ in range(count):
        cache = DynamicCache()
        with torch.no_grad():
            native(input_ids=ids, past_key_values=cache)
        caches.append(growing_cache(cache_kv(cache)))
    return caches


def test_a_native_llama_decodes_through_the_written_out_step(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    """ModelRunner takes LlamaDecodeStep for native 4-bit weights (not for float32), and its
    step gives the model's own forward's distribution (bf16 activations: close, not equal)."""

    from serve_app.engine.model_runner import ModelRunner

    native, _ = load_native_model(native_folder(tiny_gguf, tmp_path / "n"), AutoModelForCausalLM)
    assert ModelRunner(native).llama_decode is not None
    reference = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()
    assert ModelRunner(reference).llama_decode is None
    step = ModelRunner(native).llama_decode
    assert step is not None
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    caches, mask = _prefilled_caches(native, ids, 2), torch.ones((2, 13), dtype=torch.long)
    token, positions = ids[:, -1:], torch.full((2, 1), 12)
    with torch.no_grad():
        expected = native(
            input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=caches[0]
        ).logits[:, -1]
    got = step(token, positions, mask, caches[1])
    p, q = torch.log_softmax(expected, -1), torch.log_softmax(got, -1)
    assert float((p.exp() * (p - q)).sum(-1).max()) < 1e-3
    assert torch.equal(expected.argmax(-1), got.argmax(-1))


@pytest.mark.skipif(q4_kernel() is None, reason="q4_kernel.c does not build or run here")
def test_only_decode_steps_wholly_on_the_work_pool_go_ungoverned(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    """A native Llama whose every layer is one q4_kernel.c call decodes on work_pool.c, whose
    SCHED_IDLE workers give way by themselves: no thread governor (where they can be SCHED_IDLE).
    Layers with bf16 weights, fp16 copies (bigger steps on torch's matmuls) or float32 weights
    (torch's OpenMP team) keep one."""
    from serve_app.engine.model_runner import ModelRunner, _thread_governor

    def governed(model: Any) -> bool:
        step = ModelRunner(model).llama_decode
        return _thread_governor(model, torch.device("cpu"), step) is not None

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        all_q4 = tmp_path / "q4_1.gguf"
        write_tiny_gguf(all_q4, linear_types=dict.fromkeys(LINEAR_TYPES, T.Q4_1))
        folder = native_folder(all_q4, tmp_path / "n")
        native, _ = load_native_model(folder, AutoModelForCausalLM)
        assert governed(native) == (not q4_native.idle_pool_workers())  # ordinary workers: governed
        copied, _ = load_native_model(folder, AutoModelForCausalLM)
        quantized_linear.add_fp16_copies(copied, min_rows=2)
        assert governed(copied)
        mixed, _ = load_native_model(native_folder(tiny_gguf, tmp_path / "m"), AutoModelForCausalLM)
        assert governed(mixed)  # its Q8_0 and Q5_0 layers are bf16
        reference = AutoModelForCausalLM.from_pretrained(
            tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
        ).eval()
        assert governed(reference)
    finally:
        torch.set_num_threads(previous)


def test_fp16_copies_serve_the_written_out_steps_rows(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp16_copy_min_rows: every int4 layer gets a copy; a two-row decode step then runs no
    int4 kernel and gives what the model's own forward gives; under min_rows it runs the
    kernel while prefill keeps the copies."""
    from transformers import DynamicCache

    from serve_app.engine.model_runner import ModelRunner

    native, _ = load_native_model(native_folder(tiny_gguf, tmp_path / "n"), AutoModelForCausalLM)
    int4_layers = [m for m in native.modules() if isinstance(m, Int4Linear)]
    num_weights = sum(m.in_features * m.out_features for m in int4_layers)
    assert quantized_linear.add_fp16_copies(native, min_rows=2) == num_weights
    assert all(layer.fp16_parts and layer.fp16_min_rows == 2 for layer in int4_layers)
    step = ModelRunner(native).llama_decode
    assert step is not None
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    caches = _prefilled_caches(native, ids, 3)
    token, positions, mask = (
        ids[:, -1:],
        torch.full((2, 1), 12),
        torch.ones((2, 13), dtype=torch.long),
    )
    with torch.no_grad():
        expected = native(
            input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=caches[0]
        ).logits[:, -1]
    calls = _counting_kernel(monkeypatch)
    got = step(token, positions, mask, caches[1])
    assert calls == []
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for layer in int4_layers:  # steps of 2 rows now under min_rows; prefill keeps the copies
        layer.fp16_min_rows = 3
    with torch.no_grad():
        native(input_ids=ids, past_key_values=DynamicCache())
    assert calls == []
    ModelRunner(native).llama_decode(token, positions, mask, caches[2])  # type: ignore[misc]
    assert calls and set(calls) == {2}


@pytest.mark.skipif(q4_kernel() is None, reason="the C kernels do not build here")
def test_an_all_4bit_llama_decodes_each_layer_in_one_c_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every linear layer 4-bit: a decode step runs each decoder layer as one C call (no int4
    call from Python), with the torch ops' values; rows that take fp16 copies do not."""
    from transformers import DynamicCache

    from serve_app.engine import decode_native
    from serve_app.engine.batch import cache_kv
    from serve_app.engine.model_runner import ModelRunner

    gguf_path = tmp_path / "q4.gguf"
    write_tiny_gguf(gguf_path, linear_types=dict.fromkeys(LINEAR_TYPES, T.Q4_1))
    native, _ = load_native_model(native_folder(gguf_path, tmp_path / "n"), AutoModelForCausalLM)
    in_c, in_torch = ModelRunner(native).llama_decode, ModelRunner(native).llama_decode
    assert in_c is not None and in_torch is not None
    assert all(layer.native is not None for layer in in_c.layers)
    in_torch.in_c = False
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    caches = _prefilled_caches(native, ids, 3)
    token, positions = ids[:, -1:], torch.full((2, 1), 12)
    mask = torch.ones((2, 13), dtype=torch.long)
    calls = _counting_kernel(monkeypatch)
    got = in_c(token, positions, mask, caches[0])
    assert calls == []  # every matmul inside the layers' C calls
    expected = in_torch(token, positions, mask, caches[1])
    assert set(calls) == {2}
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for (ref_k, ref_v), (k, v) in zip(cache_kv(caches[1]), cache_kv(caches[0]), strict=True):
        torch.testing.assert_close(k, ref_k, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v, ref_v, rtol=1e-4, atol=1e-4)
    # a prefill of 2 x 3 tokens: each layer one C call too, the model's forward's distribution
    prompt, prompt_mask = ids[:, :3], torch.ones((2, 3), dtype=torch.long)
    prompt_positions = torch.arange(3).expand(2, 3)
    calls.clear()
    prefilled = in_c.prefill(prompt, prompt_positions, prompt_mask, in_c.empty_cache(2))
    assert calls == []
    with torch.no_grad():
        reference = native(input_ids=prompt, past_key_values=DynamicCache()).logits[:, -1]
    p, q = torch.log_softmax(reference, -1), torch.log_softmax(prefilled, -1)
    assert float((p.exp() * (p - q)).sum(-1).max()) < 1e-3
    assert torch.equal(reference.argmax(-1), prefilled.argmax(-1))
    quantized_linear.add_fp16_copies(native, min_rows=2)  # 2 rows now take the copies
    whole_layers: list[int] = []
    monkeypatch.setattr(decode_native.NativeLayer, "__call__", lambda *args: whole_layers.append(1))
    in_c_with_copies = ModelRunner(native).llama_decode
    assert in_c_with_copies is not None
    with_copies = in_c_with_copies(token, positions, mask, caches[2])
    assert whole_layers == []
    torch.testing.assert_close(with_copies, expected, rtol=1e-2, atol=1e-2)  # fp16 weights


@pytest.mark.skipif(q4_kernel() is None, reason="the C kernels do not build here")
def test_the_runner_prefills_through_the_c_layers_with_and_without_a_cached_prefix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ModelRunner.prefill of an all-4-bit Llama takes LlamaDecodeStep.prefill, whole prompt or
    the rest after a cached prefix, and picks the model's own forward's first token."""
    from typing import Any as AnyType

    from serve_app.engine.llama_decode import LlamaDecodeStep
    from serve_app.engine.model_runner import ModelRunner
    from serve_app.engine.sampling import SamplerState
    from serve_app.engine.sequence import Sequence
    from serve_app.engine.types import SamplingParams

    gguf_path = tmp_path / "q4.gguf"
    write_tiny_gguf(gguf_path, linear_types=dict.fromkeys(LINEAR_TYPES, T.Q4_1))
    native, _ = load_native_model(native_folder(gguf_path, tmp_path / "n"), AutoModelForCausalLM)
    runner = ModelRunner(native, prefix_cache_tokens=64)
    prefills: list[int] = []
    c_prefill = LlamaDecodeStep.prefill

    def counting(self: LlamaDecodeStep, ids: torch.Tensor, *args: AnyType) -> torch.Tensor:
        prefills.append(int(ids.shape[1]))
        return c_prefill(self, ids, *args)

    monkeypatch.setattr(LlamaDecodeStep, "prefill", counting)
    generator = torch.Generator().manual_seed(7)
    first = torch.randint(0, VOCAB, (20,), generator=generator).tolist()
    second = first[:16] + torch.randint(0, VOCAB, (5,), generator=generator).tolist()
    tokens = []
    for request_id, prompt in (("a", first), ("b", second)):
        seq = Sequence(
            request_id=request_id,
            prompt_ids=prompt,
            max_tokens=4,
            sampler=SamplerState(SamplingParams(temperature=0.0), VOCAB, torch.device("cpu")),
            detokenizer=AnyType,  # type: ignore[arg-type]  # prefill never detokenizes
            stop_matcher=AnyType,  # type: ignore[arg-type]
            sink=lambda _: None,
        )
        runner.lookup_prefix(seq)
        tokens.append(runner.prefill([seq]).token_ids[0])
        with torch.no_grad():
            logits = native(input_ids=torch.tensor([prompt])).logits[0, -1]
        assert tokens[-1] == int(logits.argmax())
    assert prefills == [20, 5]  # the second prompt's first 16 tokens came from the cache


def test_decoding_on_the_idle_pool_leaves_torch_one_thread(tiny_gguf: Path, tmp_path: Path) -> None:
    """Where every decode step is C on work_pool.c's SCHED_IDLE workers, the decoding thread's
    torch runs its small ops on one thread (its OpenMP worker would spin-wait beside the pool's
    worker); a model whose steps are torch's keeps its threads. Each in a thread of its own,
    as an engine's inference thread (OpenMP's count is per thread)."""
    from serve_app.engine.model_runner import ModelRunner
    from serve_app.engine.sampling import SamplerState
    from serve_app.engine.sequence import Sequence
    from serve_app.engine.types import SamplingParams

    def threads_after_a_decode(model: Any) -> int:
        seen: list[int] = []

        def decode() -> None:
            q4_native.set_threads(2)
            runner = ModelRunner(model)
            seq = Sequence(
                request_id="a",
                prompt_ids=list(range(1, 9)),
                max_tokens=4,
                sampler=SamplerState(SamplingParams(temperature=0.0), VOCAB, torch.device("cpu")),
                detokenizer=Any,  # type: ignore[arg-type]  # neither step detokenizes
                stop_matcher=Any,  # type: ignore[arg-type]
                sink=lambda _: None,
            )
            seq.last_token, seq.num_generated = runner.prefill([seq]).token_ids[0], 1
            runner.decode([seq])
            seen.append(torch.get_num_threads())

        thread = threading.Thread(target=decode)
        thread.start()
        thread.join()
        return seen[0]

    previous = torch.get_num_threads()
    try:
        all_q4 = tmp_path / "q4_1.gguf"
        write_tiny_gguf(all_q4, linear_types=dict.fromkeys(LINEAR_TYPES, T.Q4_1))
        native, _ = load_native_model(native_folder(all_q4, tmp_path / "n"), AutoModelForCausalLM)
        assert threads_after_a_decode(native) == (1 if q4_native.idle_pool_workers() else 2)
        mixed, _ = load_native_model(native_folder(tiny_gguf, tmp_path / "m"), AutoModelForCausalLM)
        assert threads_after_a_decode(mixed) == 2  # its Q8_0 and Q5_0 layers are torch's bf16
    finally:
        q4_native.set_threads(previous)


@pytest.fixture()
def fake_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Native preparation without a real tokenizer: it saves a stub tokenizer.json."""
    from types import SimpleNamespace

    import transformers

    stub = SimpleNamespace(save_pretrained=lambda d: (Path(d) / "tokenizer.json").write_text("{}"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *_, **__: stub)


def test_load_model_adds_the_copies_the_option_asks_for(
    tiny_gguf: Path, tmp_path: Path, fake_tokenizer: None
) -> None:
    from serve_app.loading import load_model

    for min_rows in (None, 8):
        engine = {"weights": "native", "fp16_copy_min_rows": min_rows}
        config = ModelConfig(id="t", kind="chat", source=str(tiny_gguf), engine=engine)
        model, _, _ = load_model(config, tmp_path / "cache", AutoModelForCausalLM, has_gpu=False)
        layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
        assert layers and all(bool(m.fp16_parts) == (min_rows is not None) for m in layers)
        assert all(m.fp16_min_rows == 8 for m in layers if m.fp16_parts)


def test_wants_native_only_for_cpu_llms() -> None:
    def model(kind: str = "chat", **engine: object) -> ModelConfig:
        return ModelConfig(
            id="m", kind=kind, source="x.gguf", engine={"weights": "native", **engine}
        )

    assert wants_native_weights(model())
    assert not wants_native_weights(model(kind="embedding"))
    assert not wants_native_weights(model(device="cuda"))
    assert not wants_native_weights(model(quantization="int8"))
    assert not wants_native_weights(model(dtype="bfloat16"))
    float32 = ModelConfig(id="m", kind="chat", source="x.gguf", engine={"weights": "float32"})
    assert not wants_native_weights(float32)


def test_prepare_native_writes_no_weights_and_follows_a_moved_file(
    tiny_gguf: Path, tmp_path: Path, fake_tokenizer: None
) -> None:
    import json
    import shutil

    from serve_app.model_store import prepare_weights

    first = tmp_path / "a" / "tiny.gguf"
    first.parent.mkdir()
    shutil.copy(tiny_gguf, first)
    config = ModelConfig(id="t", kind="chat", source=str(first), engine={"weights": "native"})
    folder = prepare_weights(config, tmp_path / "cache")
    assert is_native_folder(folder) and folder.parent.name == "native"
    assert (folder / "config.json").exists() and not list(folder.glob("*.safetensors"))
    model, _ = load_native_model(folder, AutoModelForCausalLM)
    assert isinstance(model.lm_head, Q8Linear if q4_kernel() is not None else Fp16Linear)

    moved = tmp_path / "b" / "tiny.gguf"  # same bytes, same cache key, another place
    moved.parent.mkdir()
    shutil.move(first, moved)
    config = config.model_copy(update={"source": str(moved)})
    assert prepare_weights(config, tmp_path / "cache") == folder
    assert json.loads((folder / "gguf_tensors.json").read_text())["gguf_path"] == str(moved)
    load_native_model(folder, AutoModelForCausalLM)  # reads the moved file


def test_preparation_parses_the_gguf_file_once(
    tiny_gguf: Path, tmp_path: Path, fake_tokenizer: None
) -> None:
    """The tokenizer, the config and the tensor index each read the file; the parse (every
    vocabulary string, ~13 s for Gemma-3's) is done once and shared. (The tiny file has no
    tokenizer: a stand-in; the config and the index would parse it twice.)"""
    import gguf

    from serve_app.model_store import prepare_weights

    parsed: list[str] = []
    original = gguf.GGUFReader

    class CountingReader(original):  # type: ignore[misc,valid-type]
        def __init__(self, path: Any, mode: Any = "r") -> None:
            parsed.append(str(path))
            super().__init__(path, mode)

    gguf.GGUFReader = CountingReader  # type: ignore[misc]
    try:
        config = ModelConfig(
            id="t", kind="chat", source=str(tiny_gguf), engine={"weights": "native"}
        )
        folder = prepare_weights(config, tmp_path / "cache")
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]
    assert is_native_folder(folder) and (folder / "config.json").exists()
    assert parsed == [str(tiny_gguf)]


def test_the_shared_reader_reads_what_gguf_reads(tmp_path: Path) -> None:
    """The preparation's faster reader (plain-array slices) gives every field and tensor of the
    file as gguf's own reader does: strings, arrays of strings and numbers, tensor data."""
    import gguf
    from transformers.integrations.ggml import _gguf_parse_value

    from serve_app.model_store import _one_gguf_parse, _parse_gguf_value

    path = tmp_path / "vocab.gguf"
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_token_list(["<s>", "héllo", "", "▁wörld"] * 50)
    writer.add_token_scores([0.5, -1.25, 3.0, 0.0] * 50)
    writer.add_token_types([1, 3, 1, 6] * 50)
    # Every other kind of array the bulk parse takes or leaves to gguf (nested, empty).
    writer.add_array("test.empty", [])
    writer.add_array("test.flags", [True, False, True])
    writer.add_key_value("test.wide", [2**40, 3], GGUFValueType.ARRAY, GGUFValueType.UINT64)
    writer.add_array("test.doubles", [1.5, -2.25])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_array("test.one_string", ["x"])
    writer.add_tensor("t", np.arange(96, dtype=np.float32).reshape(3, 32))
    writer.add_tensor("q", quantize(np.ones((2, 64), np.float32), T.Q8_0), raw_dtype=T.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    expected = gguf.GGUFReader(path)
    with _one_gguf_parse():
        shared = gguf.GGUFReader(path)
    assert type(shared) is not gguf.GGUFReader
    assert list(shared.fields) == list(expected.fields)
    for name, field in expected.fields.items():
        got = shared.fields[name]
        assert (got.offset, got.data, got.types) == (field.offset, field.data, field.types), name
        assert len(got.parts) == len(field.parts), name
        for mine, theirs in zip(got.parts, field.parts, strict=True):
            assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs), name
    assert shared.fields["tokenizer.ggml.tokens"].contents()[1] == "héllo"
    for name, field in expected.fields.items():  # transformers' value parse, and the faster one
        for index in field.data:
            value, types = field.parts[index], field.types
            faster = _outcome(_parse_gguf_value, _gguf_parse_value, value, types)
            assert faster == _outcome(_gguf_parse_value, value, types), name
    assert [t.name for t in shared.tensors] == [t.name for t in expected.tensors]
    for mine, theirs in zip(shared.tensors, expected.tensors, strict=True):
        assert mine.data.dtype == theirs.data.dtype and np.array_equal(mine.data, theirs.data)
        assert (mine.data_offset, mine.n_elements) == (theirs.data_offset, theirs.n_elements)


def test_a_float32_conversion_loads_its_tensors_through_the_shared_parse(tiny_gguf: Path) -> None:
    """`weights: float32` converts with transformers' GGUF load, which calls the metadata
    function with its tensor arguments (torch_dtype by keyword): the shared parse hands such
    a call to transformers as it is (it once refused the keyword, and every conversion on a
    machine without a converted folder failed)."""
    from serve_app.model_store import _one_gguf_parse

    def load() -> Any:
        return AutoModelForCausalLM.from_pretrained(
            tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
        )

    expected = load().state_dict()
    with _one_gguf_parse():
        converted = load().state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[name], expected[name]) for name in expected)


def _outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    """What a call returned (value and type) or raised (the exception's type)."""
    try:
        value = fn(*args)
    except Exception as exc:  # noqa: BLE001  # compared, not handled
        return ("raised", type(exc))
    return ("returned", (type(value), value))


def test_transformers_metadata_pass_runs_once_per_file(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' metadata pass (every field to Python values, Gemma-3's 262k-token
    vocabulary included) is asked for twice per preparation, for the tokenizer's class and for
    the config: it runs once, and each caller gets a config of its own to edit."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from serve_app.model_store import _one_gguf_parse

    calls: list[str] = []
    original = gguf_utils.load_gguf_checkpoint

    def counting(
        path: Any, return_tensors: Any = False, model: Any = None, dtype: Any = None
    ) -> Any:
        calls.append(str(path))
        return original(path, return_tensors, model, dtype)

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", counting)
    with _one_gguf_parse():
        first = gguf_utils.load_gguf_checkpoint(str(tiny_gguf))
        unchanged = dict(first["config"])
        first["config"]["num_hidden_layers"] = -1  # what a caller may do to its copy
        second = gguf_utils.load_gguf_checkpoint(str(tiny_gguf), return_tensors=False)
    assert calls == [str(tiny_gguf)]
    assert second["config"] == unchanged and unchanged["num_hidden_layers"] != -1
    assert gguf_utils.load_gguf_checkpoint is counting  # put back
