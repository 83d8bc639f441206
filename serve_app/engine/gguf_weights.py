"""GGUF tensors -> the model's layers without a float32 copy of the checkpoint ("native" weights).

A model skeleton is built on the meta device from the cached config; each tensor is read from
the memory-mapped GGUF file by the index model_store wrote (name, type, shape, offset) and
placed: Q4_0/Q4_1/Q4_K linears as int4 groups of 32 (the GGUF's own values: a Q4_K sub-block
of 32 has one 6-bit scale and min, so it is one group), other quantized linears as bf16, the
output layer as fp16 (float32 logits), a Q8_0 vocabulary's lookup on the file's own rows
(mapped), small float tensors (norms) as float32.
"""

from __future__ import annotations

import json
import logging
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

from serve_app.engine.packed_linear import PackedLinear
from serve_app.engine.q4_native import q4_kernel
from serve_app.engine.quantized_linear import (
    GROUP_SIZE,
    Bf16Embedding,
    Bf16Linear,
    Fp16Linear,
    Int4Linear,
    Q8Embedding,
    Q8Linear,
)

logger = logging.getLogger(__name__)

T = GGMLQuantizationType
INT4_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q4_K})
FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16})
INDEX_FILE = "gguf_tensors.json"


@dataclass(slots=True, frozen=True)
class TensorEntry:
    """One tensor of a GGUF file: shape in torch order ([rows, columns])."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    num_bytes: int


def write_index(gguf_path: Path, directory: Path) -> None:
    """Writes the tensor index of gguf_path into directory (read once, at preparation)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    tensors = [
        {
            "name": t.name,
            "type": int(t.tensor_type),
            "shape": [int(n) for n in reversed(t.shape)],
            "offset": int(t.data_offset),
            "num_bytes": int(t.n_bytes),
        }
        for t in reader.tensors
    ]
    index = {"gguf_path": str(gguf_path), "architecture": architecture, "tensors": tensors}
    (directory / INDEX_FILE).write_text(json.dumps(index))


def read_index(directory: Path) -> tuple[Path, str, list[TensorEntry]]:
    index = json.loads((directory / INDEX_FILE).read_text())
    entries = [
        TensorEntry(t["name"], T(t["type"]), tuple(t["shape"]), t["offset"], t["num_bytes"])
        for t in index["tensors"]
    ]
    return Path(index["gguf_path"]), index["architecture"], entries


# ---- block formats ---------------------------------------------------------------------


def _blocks(raw: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """[rows, row bytes] -> [rows, blocks per row, block bytes]."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    return raw.reshape(raw.shape[0], -1, type_size)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[..., start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values: low nibbles first, then high (Q4_0/Q4_1 order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def int4_groups(
    raw: np.ndarray, qtype: GGMLQuantizationType
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0/Q4_1/Q4_K tensor [rows, row bytes] -> (q [N, K] 0..15, scales, zeros [N, K/32])
    with w = (q - 8) * scale + zero, the int4 kernel's form."""
    blocks = _blocks(raw, qtype)
    rows = raw.shape[0]
    if qtype == T.Q4_0:  # w = (q - 8) * d
        d = _f16(blocks, 0)
        q = _nibbles(blocks[..., 2:])
        scales, zeros = d, np.zeros_like(d)
    elif qtype == T.Q4_1:  # w = q * d + m
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        q = _nibbles(blocks[..., 4:])
        scales, zeros = d, m + 8 * d
    elif qtype == T.Q4_K:  # 8 sub-blocks of 32: w = d * sc * q - dmin * mn
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)
        sc, mn = _q4k_scales(blocks[..., 4:16])
        qs = blocks[..., 16:].reshape(*blocks.shape[:2], 4, 32)
        q = np.stack([qs & 0x0F, qs >> 4], axis=3)  # [rows, nb, 4, 2, 32]
        scales = d * sc
        zeros = 8 * scales - dmin * mn
    else:
        raise ValueError(f"{qtype.name} is not a 4-bit type")
    return q.reshape(rows, -1), scales.reshape(rows, -1), zeros.reshape(rows, -1)


def _q4k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of Q4_K/Q5_K blocks -> 8 six-bit (scale, min) pairs, as float32."""
    s = packed.astype(np.uint16)
    low_sc, low_mn = s[..., 0:4] & 63, s[..., 4:8] & 63
    high_sc = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    high_mn = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    sc = np.concatenate([low_sc, high_sc], axis=-1).astype(np.float32)
    mn = np.concatenate([low_mn, high_mn], axis=-1).astype(np.float32)
    return sc, mn


def dequantized(raw: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    """The GGUF's own float values of a tensor, float32 (torch for Q8_0, gguf's numpy else)."""
    if qtype == T.Q8_0:  # the big vocabulary matrices: 10x faster than gguf's numpy
        blocks = torch.from_numpy(np.ascontiguousarray(_blocks(raw, qtype)))
        d = blocks[..., :2].contiguous().view(torch.float16).float()
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
        return (q * d).reshape(raw.shape[0], -1)
    values = dequantize(np.asarray(raw), qtype)
    return torch.from_numpy(np.array(values, dtype=np.float32))  # own, writable copy


# ---- building the model ----------------------------------------------------------------


@dataclass(slots=True)
class LoadReport:
    """What became of each GGUF type: counts per (type, form)."""

    forms: dict[str, int]

    def add(self, qtype: GGMLQuantizationType, form: str) -> None:
        key = f"{qtype.name}->{form}"
        self.forms[key] = self.forms.get(key, 0) + 1


def int4_linear(raw: np.ndarray, qtype: GGMLQuantizationType, bias: Any = None) -> Int4Linear:
    q, scales, zeros = int4_groups(raw, qtype)
    return Int4Linear(
        torch.from_numpy(q.astype(np.int32)),
        torch.from_numpy(scales),
        torch.from_numpy(zeros),
        bias,
    )


def quantized_linear(
    raw: np.ndarray, qtype: GGMLQuantizationType, bias: torch.Tensor | None, report: LoadReport
) -> torch.nn.Module:
    """The layer for one GGUF linear weight: int4 (4-bit types), bf16 (other quantized types),
    or float32 prepacked (float types)."""
    if qtype in INT4_TYPES and _columns(raw, qtype) % GROUP_SIZE == 0:
        report.add(qtype, "int4")
        return int4_linear(raw, qtype, bias)
    weight = dequantized(raw, qtype)
    if qtype in FLOAT_TYPES:
        report.add(qtype, "float32")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        linear.weight.data = weight
        if bias is not None:
            linear.bias.data = bias
        return PackedLinear(linear)
    report.add(qtype, "bf16")
    return Bf16Linear(weight, bias)


def _columns(raw: np.ndarray, qtype: GGMLQuantizationType) -> int:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return raw.shape[1] // type_size * block_size


class NativeLoadError(RuntimeError):
    """The GGUF cannot be placed natively (unknown architecture or tensor layout)."""


# Architectures whose GGUF -> HF tensor processing only permutes rows (or touches float norms),
# which is the same on quantized rows as on their dequantized values.
_ROW_ONLY_PROCESSORS = ("TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor")


def load_native_model(directory: Path, auto_class: Any) -> tuple[Any, LoadReport]:
    """A model for the cached config in `directory`, its weights taken from the GGUF file that
    directory's index names. Returns (model in eval mode, what each tensor type became)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, dtype=torch.float32)
    report = _fill(model, read_tensors(directory, model), directory)
    return model.eval(), report


def read_tensors(directory: Path, model: Any) -> dict[str, tuple[GGMLQuantizationType, np.ndarray]]:
    """The GGUF's tensors by the model's parameter names: (type, rows of raw bytes, or float
    values for float types), copied out of the file's map, which is closed again."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    gguf_path, architecture, entries = read_index(directory)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
    if type(processor).__name__ not in _ROW_ONLY_PROCESSORS:
        raise NativeLoadError(f"architecture '{architecture}' is not supported natively")
    names = _gguf_to_hf_names(model, architecture)
    data = np.memmap(gguf_path, dtype=np.uint8, mode="r")
    try:
        return {
            names[e.name]: (e.qtype, _raw(data, e, processor)) for e in entries if e.name in names
        }
    finally:
        del data  # unmapped: the file's pages are no longer counted in this process


def _gguf_to_hf_names(model: Any, architecture: str) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name. transformers' get_gguf_hf_weights_map
    does the same but builds gguf's name table once per submodule (~10 s for SmolLM2); this
    builds it once and, as that one does, also tries each name without its leading parts."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((a for a, n in MODEL_ARCH_NAMES.items() if n == architecture), None)
    if arch is None:
        raise NativeLoadError(f"gguf does not know the architecture '{architecture}'")
    table = get_tensor_name_map(arch, model.config.get_text_config().num_hidden_layers)
    names: dict[str, str] = {}
    for hf_name in model.state_dict():
        base, dot, suffix = hf_name.rpartition(".")
        parts = base.split(".")
        for start in range(len(parts)):
            gguf_name = table.get_name(".".join(parts[start:]))
            if gguf_name is not None:
                names.setdefault(f"{gguf_name}{dot}{suffix}", hf_name)
                break
    return names


def _raw(data: np.memmap, entry: TensorEntry, processor: Any) -> np.ndarray:
    """One tensor's bytes as [rows, row bytes] (float types: values), processed as transformers
    processes its dequantized values (Llama's q/k row order, Gemma's norm offset)."""
    chunk = data[entry.offset : entry.offset + entry.num_bytes]
    if entry.qtype in FLOAT_TYPES:
        values = dequantized(np.asarray(chunk).reshape(entry.shape[0], -1), entry.qtype).numpy()
        return np.asarray(
            processor.process(weights=values.reshape(entry.shape), name=entry.name).weights
        )
    raw = np.array(chunk).reshape(entry.shape[0], -1)  # a copy: the map is closed after loading
    return np.asarray(processor.process(weights=raw, name=entry.name).weights)


def _fill(
    model: Any, tensors: dict[str, tuple[GGMLQuantizationType, np.ndarray]], directory: Path
) -> LoadReport:
    report = LoadReport({})
    _place_vocabulary(model, tensors, directory, report)
    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{module_name}.{child_name}" if module_name else child_name
            if type(child) is torch.nn.Linear and f"{full}.weight" in tensors:
                qtype, raw = tensors.pop(f"{full}.weight")
                bias = _float(tensors.pop(f"{full}.bias", None))
                setattr(module, child_name, quantized_linear(raw, qtype, bias, report))
    for name, (qtype, raw) in tensors.items():
        _set_tensor(model, name, _float((qtype, raw)))
        report.add(qtype, "float32")
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise NativeLoadError(f"tensors missing from the GGUF file: {missing[:5]}")
    return report


def _float(item: tuple[GGMLQuantizationType, np.ndarray] | None) -> torch.Tensor | None:
    if item is None:
        return None
    qtype, raw = item
    if qtype in FLOAT_TYPES:
        return torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
    return dequantized(raw, qtype)


def _place_vocabulary(
    model: Any,
    tensors: dict[str, tuple[GGMLQuantizationType, np.ndarray]],
    directory: Path,
    report: LoadReport,
) -> None:
    """The embedding lookup on the file's Q8_0 rows, mapped (other types: a bf16 table); a tied
    output layer on the same rows where q4_kernel.c runs (Q8Linear), else, tied or not, in fp16
    with float32 logits (Fp16Linear says why)."""
    embeddings = model.get_input_embeddings()
    name = next(n for n, p in model.named_parameters() if p is embeddings.weight)
    head = model.get_output_embeddings()
    head_name = next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)
    tied = head_name is not None and head_name not in tensors
    qtype, raw = tensors.pop(name)
    scale = getattr(embeddings, "embed_scale", None)
    scale = scale if torch.is_tensor(scale) else None
    rows = _mapped_rows(directory, VOCABULARY_TENSOR) if qtype == T.Q8_0 else None
    rows = rows if rows is not None and rows.shape[0] == raw.shape[0] else None
    if tied and rows is not None and q4_kernel() is not None:
        model.set_output_embeddings(Q8Linear(rows))
        report.add(qtype, "Q8_0 rows tied head")
    elif tied:
        model.set_output_embeddings(Fp16Linear(_values(qtype, raw, torch.float16)))
        report.add(qtype, "fp16 tied head")
    elif head_name is not None:
        head_qtype, head_raw = tensors.pop(head_name)
        head_bias = _float(tensors.pop(head_name.removesuffix("weight") + "bias", None))
        values = _values(head_qtype, head_raw, torch.float16)
        model.set_output_embeddings(Fp16Linear(values, head_bias))
        report.add(head_qtype, "fp16 head")
    if rows is not None:
        model.set_input_embeddings(Q8Embedding(rows, scale))
        report.add(qtype, "Q8_0 rows embedding")
    else:
        model.set_input_embeddings(Bf16Embedding(_values(qtype, raw, torch.bfloat16), scale))
        report.add(qtype, "bf16 embedding")


def _values(
    qtype: GGMLQuantizationType, raw: np.ndarray, dtype: torch.dtype, rows: int = 16384
) -> torch.Tensor:
    """A tensor's values in `dtype`, dequantized a slice of rows at a time: a vocabulary's
    float32 copy (671 MB for Gemma-3's) is never whole in memory."""
    slices = (raw[start : start + rows] for start in range(0, len(raw), rows))
    return torch.cat([torch.as_tensor(_float((qtype, part))).to(dtype) for part in slices])


# The input embeddings' GGUF name in every llama.cpp architecture; the row-only processors
# (_ROW_ONLY_PROCESSORS) leave its rows as the file has them.
VOCABULARY_TENSOR = "token_embd.weight"


def _mapped_rows(directory: Path, tensor_name: str) -> torch.Tensor | None:
    """A tensor's bytes [rows, row bytes] as a copy-on-write map of the GGUF file: no read, and
    only the pages touched later become resident. None when the index has no such tensor."""
    gguf_path, _, entries = read_index(directory)
    entry = next((e for e in entries if e.name == tensor_name), None)
    if entry is None:
        return None
    with gguf_path.open("rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    tensor = torch.frombuffer(mapped, dtype=torch.uint8, count=entry.num_bytes, offset=entry.offset)
    return tensor.view(entry.shape[0], -1)  # holds the map open as long as it lives


def _set_tensor(model: Any, name: str, value: torch.Tensor | None) -> None:
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attribute)
    assert value is not None
    if tuple(old.shape) != tuple(value.shape):
        raise NativeLoadError(f"{name}: GGUF shape {tuple(value.shape)}, model {tuple(old.shape)}")
    setattr(module, attribute, torch.nn.Parameter(value.contiguous(), requires_grad=False))
