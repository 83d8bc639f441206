"""nn.Linear layers with weights prepacked once for oneDNN (CPU, float32).

`aten::linear` on CPU hands the plain weight to the BLAS, which re-blocks it in every call; at
decode-sized inputs (a few rows) that costs as much as the arithmetic. Reordering each weight
once into oneDNN's blocked layout (the op torch's inductor uses for frozen CPU graphs) made the
matmuls of a SmolLM2 step 1.7x faster at batch 1 and 2x at batch 16 on the 2-core AVX2 machine,
and the whole step 1.3x / 1.8x (benchmarks/decode_step.py; docs/benchmarks.md), with the same
results to float32 rounding.
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path
from typing import Any

import torch

from serve_app.model_store import read_safetensors_header

logger = logging.getLogger(__name__)


class PackedLinear(torch.nn.Module):
    """Inference-only stand-in for nn.Linear; holds the packed weight instead of the plain one."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A plain attribute, not a Parameter: the opaque oneDNN tensor is never trained or saved.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        # Copied: the plain bias may live in the loader's map of the weights file, which must
        # be released (_own_remaining_tensors does not see plain attributes).
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.is_contiguous() else x.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def can_pack(model: Any) -> bool:
    """Only float32 on the CPU, where oneDNN is built in."""
    parameter = next(model.parameters())
    return bool(
        torch.backends.mkldnn.is_available()
        and parameter.device.type == "cpu"
        and parameter.dtype == torch.float32
    )


def pack_linear_layers(model: Any, weights_dir: Path | None = None) -> int:
    """Replaces every nn.Linear of `model` with a PackedLinear; returns how many.

    An output layer tied to the input embeddings (SmolLM2, Gemma) is packed too when the
    embedding matrix can be read straight from the float32 safetensors file in `weights_dir`
    (mapped, so only the rows looked up become resident); otherwise it stays plain, because the
    lookup would need a second, plain copy of the vocabulary matrix.
    """
    tied = _tied_output_layer(model)
    mapped = None
    if tied is not None and weights_dir is not None:
        mapped = _map_input_embeddings(model, weights_dir)
        tied = None if mapped is not None else tied
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child is not tied:
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    _own_remaining_tensors(model, keep=mapped)
    logger.info("packed %d Linear layers for oneDNN%s", replaced, " (tied head kept)" * bool(tied))
    return replaced


def _own_remaining_tensors(model: Any, keep: torch.Tensor | None) -> None:
    """Copies the tensors left unpacked (norms, biases, ...) out of the loader's memory map of
    the weights file. transformers maps that file; while any tensor still points into it, every
    page that packing read stays resident, doubling the replica's memory."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor is not keep:
            tensor.data = tensor.data.clone()


def _tied_output_layer(model: Any) -> torch.nn.Module | None:
    get_output, get_input = (
        getattr(model, "get_output_embeddings", None),
        getattr(model, "get_input_embeddings", None),
    )
    if get_output is None or get_input is None:
        return None
    output, embeddings = get_output(), get_input()
    if output is None or embeddings is None:
        return None
    is_tied = output.weight.data_ptr() == embeddings.weight.data_ptr()
    return output if is_tied else None


def _map_input_embeddings(model: Any, weights_dir: Path) -> torch.Tensor | None:
    """Unties the head: it keeps the loaded matrix (to be packed), the embedding lookup reads the
    same values from the mapped file. Returns the lookup's new weight; None (nothing changed)
    when the file has no such float32 tensor."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    name = next(n for n, p in model.named_parameters() if p is embeddings.weight)
    for path in sorted(weights_dir.glob("*.safetensors")):
        mapped = _mapped_float32(path, name)
        if mapped is not None and mapped.shape == embeddings.weight.shape:
            head.weight = torch.nn.Parameter(embeddings.weight.detach(), requires_grad=False)
            embeddings.weight = torch.nn.Parameter(mapped, requires_grad=False)
            return embeddings.weight
    return None


def _mapped_float32(path: Path, key: str) -> torch.Tensor | None:
    """A float32 tensor of a safetensors file as a copy-on-write memory map (no read, no copy)."""
    header_len, header = read_safetensors_header(path)
    entry = header.get(key)
    if entry is None or entry["dtype"] != "F32":
        return None
    with path.open("rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    begin, end = entry["data_offsets"]
    tensor = torch.frombuffer(
        mapped, dtype=torch.float32, count=(end - begin) // 4, offset=8 + header_len + begin
    )  # holds a reference to the map, which stays open as long as the tensor lives
    return tensor.view(entry["shape"])
