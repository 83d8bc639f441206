"""The C kernels of native GGUF weights, built once per machine with the C compiler into one
library and loaded with ctypes: q4_kernel.c multiplies 4-bit weights in Q4_1 form (Int4Linear)
and Q8_0 rows (a tied output layer, Q8Linear); decode_kernel.c runs the rest of a Llama decode
step (its Python side: decode_native.py).

On a CPU without bf16 instructions torch's int4 kernel emulates bf16 activations. q4_kernel.c
multiplies with integer instructions on activations quantized to 16 bits per block of 32 (8
bits, llama.cpp's choice, failed SmolLM2's quality guard), and from 8 rows on with float32 FMAs
on weights decoded once per call, in register tiles: 1.4-2x torch's int4 kernel at one row
(docs/benchmarks.md, session 19), and from 8 rows faster than fbgemm's fp16 GEMM in a whole
decode step (session 25; Q8_0 output rows take the same float path). Their parallel loops run
on work_pool.c's threads, not OpenMP's (it says why); `set_threads` sets torch's thread count
and the pool's together, and the thread governor goes through it.

Where there is no C compiler, no AVX2/FMA/F16C, or SERVE_APP_INT4_KERNEL=torch, `q4_kernel()` is
None and the layers keep torch's int4 kernel and an fp16 head.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
SOURCES = [_HERE / "q4_kernel.c", _HERE / "decode_kernel.c", _HERE / "work_pool.c"]
HEADERS = [_HERE / "kernel_simd.h", _HERE / "work_pool.h"]
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-pthread", "-shared", "-fPIC"]
GROUP = 32
KERNEL_ENV = "SERVE_APP_INT4_KERNEL"  # "auto" (default) or "torch"


@functools.cache
def q4_kernel() -> ctypes.CDLL | None:
    """The compiled kernel library, or None where it cannot run here (logged once)."""
    if os.environ.get(KERNEL_ENV, "auto") == "torch":
        return None
    if not _cpu_has("avx2", "fma", "f16c"):
        logger.info("int4 layers on torch's kernel: this CPU has no AVX2/FMA/F16C")
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        logger.warning("int4 layers on torch's kernel: no C compiler to build q4_kernel.c")
        return None
    try:
        library = ctypes.CDLL(str(_built_library(compiler)))
    except (OSError, subprocess.SubprocessError) as exc:  # a failed or timed-out compile too
        logger.warning("int4 layers on torch's kernel: q4_kernel.c did not build: %s", exc)
        return None
    pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    library.q4_matmul.argtypes = [pointer, size, size, pointer, pointer, pointer, size, pointer]
    library.q4_dequantize.argtypes = [pointer, pointer, pointer, size, size, pointer]
    library.q8_matmul.argtypes = [pointer, size, size, pointer, size, size, pointer]
    library.rms_norm.argtypes = [pointer, size, size, pointer, real, pointer]
    library.add_rms_norm.argtypes = [pointer, pointer, size, size, pointer, real, pointer]
    library.silu_mul.argtypes = [pointer, size, size, pointer]
    library.decode_attention.argtypes = [pointer, *[size] * 5, real, *[pointer] * 4, size, size]
    library.decode_attention.argtypes += [pointer, pointer]
    library.llama_layer_decode.argtypes = [pointer, pointer, size, size, *[pointer] * 4, size]
    library.llama_layer_decode.argtypes += [size, pointer]
    for name in ("q4_matmul", "q8_matmul", "decode_attention", "llama_layer_decode"):
        getattr(library, name).restype = ctypes.c_int  # 0, or -1: out of memory or shapes
    library.work_pool_set_threads.argtypes = [ctypes.c_int]
    library.work_pool_lifts.restype = ctypes.c_int64
    library.work_pool_set_threads(torch.get_num_threads())
    logger.info("int4 layers on q4_kernel.c (%s)", library._name)
    return library


def set_threads(threads: int) -> None:
    """torch's intra-op threads and the C kernels' pool, together (the thread governor's
    setter); the pool takes torch's count when the library loads."""
    torch.set_num_threads(threads)
    if q4_kernel.cache_info().currsize:  # only once loaded: this must not compile it
        library = q4_kernel()
        if library is not None:
            library.work_pool_set_threads(threads)


def keep_torch_on_one_thread() -> None:
    """torch's intra-op threads to one, the pool's left as they are: for steps wholly on the
    pool's SCHED_IDLE workers, whose only torch ops are small (the embedding, argmax, sampling).
    With more, torch's OpenMP worker spin-waits after each of them as an ordinary thread, on the
    core the pool's worker would run on (offline SmolLM2 at c=16: 11% of the process's samples
    in libgomp's spin; docs/benchmarks.md, session 27). Call it on the thread that runs them
    (OpenMP's thread count is per thread)."""
    torch.set_num_threads(1)


@contextmanager
def torch_threads_of_pool() -> Iterator[None]:
    """torch's intra-op threads raised to the pool's count for a while: a big prefill's
    matmuls on torch's sgemm, where keep_torch_on_one_thread left torch on one."""
    library = q4_kernel() if q4_kernel.cache_info().currsize else None
    previous = torch.get_num_threads()
    pool = library.work_pool_threads() if library is not None else previous
    if pool <= previous:
        yield
        return
    torch.set_num_threads(pool)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def idle_pool_workers() -> bool:
    """Whether work_pool.c's workers are SCHED_IDLE in this process (it may lift them back when
    its caller waits on one): then the decode steps it runs need no thread governor."""
    library = q4_kernel()
    return library is not None and library.work_pool_idle_workers() == 1


def _cpu_has(*flags: str) -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return set(flags) <= set(line.split())


def _built_library(compiler: str) -> Path:
    """The shared library for these sources and flags, compiled once into the kernel cache
    (under a lock: replicas of several models start together)."""
    source = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    cache = Path(
        os.environ.get("SERVE_APP_KERNEL_DIR") or Path.home() / ".cache" / "serve-app" / "kernels"
    )
    cache.mkdir(parents=True, exist_ok=True)
    library = cache / f"q4_kernel-{key}.so"
    if library.exists():
        return library
    with open(cache / f"q4_kernel-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not library.exists():
            partial = library.with_suffix(f".{os.getpid()}.tmp")
            subprocess.run(
                [compiler, *FLAGS, "-o", str(partial), *map(str, SOURCES)],
                check=True,
                capture_output=True,
                timeout=120,
            )
            partial.rename(library)  # atomic: another process sees all of it or none
    return library


class Q4Weight:
    """One linear layer's weight [N, K] as the kernel reads it: per output row and block of 32
    inputs, 16 bytes of nibbles (low nibble value j, high nibble value j + 16), w = q * d + m
    with d, m float32 (the GGUF's fp16 factors exactly)."""

    def __init__(self, nibbles: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> None:
        self.nibbles, self.d, self.m = nibbles, d, m  # [N, K/2] uint8, [N, K/32] float32 x2
        self.out_features, self.in_features = nibbles.shape[0], nibbles.shape[1] * 2
        # the addresses the kernel reads, taken once (these tensors are never resized)
        self._pointers = (nibbles.data_ptr(), d.data_ptr(), m.data_ptr())

    @classmethod
    def from_groups(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> Q4Weight:
        """From Int4Linear's groups: q [N, K] 0..15, w = (q - 8) * scale + zero per 32."""
        n, k = q.shape
        halves = q.to(torch.uint8).reshape(n, k // GROUP, 2, GROUP // 2)
        nibbles = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
        d = scales.float().contiguous()
        return cls(nibbles, d, (zeros.float() - 8 * d).contiguous())

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [M, K] -> [M, N] float32."""
        kernel = q4_kernel()
        assert kernel is not None
        x = rows.float().contiguous()
        y = torch.empty(x.shape[0], self.out_features)
        nibbles, d, m = self._pointers
        size = (x.shape[0], self.in_features, self.out_features)
        status = kernel.q4_matmul(x.data_ptr(), *size[:2], nibbles, d, m, size[2], y.data_ptr())
        return checked(status, y)

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """The weight as float32 [N, K] written into `out` (numel N * K, contiguous)."""
        kernel = q4_kernel()
        assert kernel is not None
        weight = out.view(self.out_features, self.in_features)
        kernel.q4_dequantize(
            self.nibbles.data_ptr(),
            self.d.data_ptr(),
            self.m.data_ptr(),
            self.out_features,
            self.in_features,
            weight.data_ptr(),
        )
        return weight

    def rows(self, start: int, stop: int) -> Q4Weight:
        """Output rows start..stop as views of this weight (no copy)."""
        return Q4Weight(self.nibbles[start:stop], self.d[start:stop], self.m[start:stop])

    @staticmethod
    def cat(weights: list[Q4Weight]) -> Q4Weight:
        return Q4Weight(
            torch.cat([w.nibbles for w in weights]),
            torch.cat([w.d for w in weights]),
            torch.cat([w.m for w in weights]),
        )


def q8_matmul(rows: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """rows [M, K] float32 times Q8_0 rows `blocks` [N, K / 32 * 34] (the GGUF's own bytes:
    per block of 32 an fp16 scale, then 32 int8) transposed -> [M, N] float32."""
    kernel = q4_kernel()
    assert kernel is not None
    x = rows.float().contiguous()
    num_outputs, row_bytes = blocks.shape
    y = torch.empty(x.shape[0], num_outputs)
    status = kernel.q8_matmul(
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        blocks.data_ptr(),
        row_bytes,
        num_outputs,
        y.data_ptr(),
    )
    return checked(status, y)


def checked(status: int, result: torch.Tensor) -> torch.Tensor:
    """result, or MemoryError where a C kernel returned -1 (its buffers could not be allocated;
    the callers check the shapes the kernels refuse before calling)."""
    if status != 0:
        raise MemoryError("a C kernel could not allocate its buffers")
    return result
