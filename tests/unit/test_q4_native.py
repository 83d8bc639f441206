"""q4_kernel.c is built once per machine into the kernel cache, and where it cannot be built or
run (no compiler, no AVX2, or SERVE_APP_INT4_KERNEL=torch) int4 layers keep torch's kernel."""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Callable, Iterator
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
    q4_native.set_threads(threads)
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
        q4_native.set_threads(previous)


_POOL_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)


def _pool_for() -> Callable[[int, int, Callable[[int, int], None]], None]:
    """work_pool.c's work_pool_for(items, chunk, fn) with a Python fn(begin, end)."""
    library = q4_kernel()
    assert library is not None
    library.work_pool_for.argtypes = [
        ctypes.c_int64,
        ctypes.c_int64,
        _POOL_CALLBACK,
        ctypes.c_void_p,
    ]

    def pool_for(items: int, chunk: int, fn: Callable[[int, int], None]) -> None:
        callback = _POOL_CALLBACK(lambda _, begin, end: fn(begin, end))
        library.work_pool_for(items, chunk, callback, None)

    return pool_for


@contextlib.contextmanager
def _pool_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    q4_native.set_threads(threads)
    try:
        yield
    finally:
        q4_native.set_threads(previous)


@pytest.mark.skipif(q4_kernel() is None, reason="q4_kernel.c does not build or run here")
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_the_work_pool_runs_every_item_once(threads: int) -> None:
    """work_pool.c's loops: every item exactly once whatever the chunk size and thread count,
    loop after loop (the workers claim chunks of each new loop, or find none left)."""
    pool_for, counts, lock = _pool_for(), [], threading.Lock()

    def run(begin: int, end: int) -> None:
        with lock:  # ctypes runs the callback on the workers too (holding the GIL)
            for item in range(begin, end):
                counts[item] += 1

    with _pool_threads(threads):
        for items, chunk in [(1, 1), (2, 1), (7, 3), (100, 1), (1000, 7), (64, 64), (5, 100)]:
            for _ in range(20):
                counts[:] = [0] * items
                pool_for(items, chunk, run)
                assert counts == [1] * items, (items, chunk)


@pytest.mark.skipif(q4_kernel() is None, reason="q4_kernel.c does not build or run here")
def test_loops_from_two_threads_at_once_each_run_every_item_once() -> None:
    """Two engines in one process call the kernels from two inference threads: a loop started
    while another runs goes alone, and neither loses or repeats an item."""
    pool_for, lock = _pool_for(), threading.Lock()
    counts = {name: [0] * 40 for name in ("a", "b")}

    def loops(name: str) -> None:
        def run(begin: int, end: int) -> None:
            time.sleep(0.0002)  # lets go of the GIL: the two callers' loops overlap
            with lock:
                for item in range(begin, end):
                    counts[name][item] += 1

        for _ in range(30):
            pool_for(40, 3, run)

    with _pool_threads(2):
        threads = [threading.Thread(target=loops, args=(name,)) for name in counts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert counts == {"a": [30] * 40, "b": [30] * 40}


@pytest.mark.skipif(q4_kernel() is None, reason="q4_kernel.c does not build or run here")
def test_a_loop_returns_only_after_the_workers_chunks_end() -> None:
    """Chunks that outlast the caller's spin (it then sleeps until a worker's last chunk wakes
    it): the loop returns with every chunk run and none still running, loop after loop."""
    pool_for, counts, running, lock = _pool_for(), [0] * 6, [0], threading.Lock()

    def slow(begin: int, end: int) -> None:
        with lock:
            running[0] += 1
        time.sleep(0.002)  # lets go of the GIL: the caller and the worker overlap
        with lock:
            running[0] -= 1
            for item in range(begin, end):
                counts[item] += 1

    with _pool_threads(2):
        for loop in range(1, 21):
            pool_for(6, 1, slow)
            assert running == [0] and counts == [loop] * 6


SCHED_OTHER, SCHED_IDLE = 0, 5


@pytest.mark.skipif(q4_kernel() is None, reason="q4_kernel.c does not build or run here")
def test_a_caller_lifts_the_worker_it_waits_on_until_its_chunk_is_done() -> None:
    """A SCHED_IDLE worker preempted mid-chunk gets no time while every core is wanted, so a
    caller that waits 1 ms on one lifts it to SCHED_OTHER; done, it is SCHED_IDLE again."""
    if not q4_native.idle_pool_workers():
        pytest.skip("this process may not lift a SCHED_IDLE thread back (no CAP_SYS_NICE)")
    library, pool_for = q4_kernel(), _pool_for()
    assert library is not None
    caller = threading.get_native_id()
    runners: list[int] = []
    policy_late_in_chunk: dict[int, int] = {}

    def worker_is_slow(begin: int, end: int) -> None:
        me = threading.get_native_id()
        runners.append(me)
        if me == caller:
            time.sleep(0.0005)  # lets go of the GIL: a worker can take a chunk meanwhile
            return
        time.sleep(0.01)  # 10 ms: well past the 1 ms the caller waits before it lifts
        policy_late_in_chunk[me] = _scheduling_policies()[me]

    with _pool_threads(2):
        lifts = library.work_pool_lifts()
        for _ in range(500):  # until a worker has taken a chunk (it runs only on an idle core)
            runners.clear()
            pool_for(4, 1, worker_is_slow)
            if set(runners) != {caller}:
                break
        workers = set(runners) - {caller}
        assert workers, "no worker took a chunk in 500 loops"
        assert library.work_pool_lifts() > lifts
        assert {policy_late_in_chunk[w] for w in workers} == {SCHED_OTHER}
        deadline = time.monotonic() + 5.0  # the worker settles in its wait for the next loop
        while time.monotonic() < deadline and {_scheduling_policies()[w] for w in workers} != {
            SCHED_IDLE
        }:
            time.sleep(0.01)
        assert {_scheduling_policies()[w] for w in workers} == {SCHED_IDLE}


def _scheduling_policies() -> dict[int, int]:
    """This process's threads: thread id -> scheduling policy (field 41 of /proc's stat)."""
    policies = {}
    for task in Path("/proc/self/task").iterdir():
        fields = (task / "stat").read_text().rpartition(")")[2].split()
        policies[int(task.name)] = int(fields[38])
    return policies


@pytest.mark.skipif(q4_kernel() is None, reason="q4_kernel.c does not build or run here")
def test_the_pool_workers_are_sched_idle_where_they_can_be_lifted() -> None:
    """The workers are SCHED_IDLE (they never take a core from the serving processes) where this
    process may lift them back, ordinary threads otherwise; the calling thread keeps its own."""
    with _pool_threads(2):
        _pool_for()(64, 1, lambda begin, end: None)
        policies = _scheduling_policies()
    assert policies[threading.get_native_id()] != SCHED_IDLE
    if q4_native.idle_pool_workers():
        assert SCHED_IDLE in policies.values()
    else:
        assert SCHED_IDLE not in policies.values()


@pytest.mark.skipif(q4_kernel() is None, reason="q4_kernel.c does not build or run here")
def test_torch_threads_rise_to_the_pools_count_only_inside_torch_threads_of_pool() -> None:
    """Steps on the pool keep torch on one thread; a forward of torch's matmuls or attention
    gets the pool's thread count for its duration, then torch is back on one. Torch at the
    pool's count or more is left as it is. In a thread of its own: OpenMP's count is per thread."""
    library = q4_kernel()
    assert library is not None
    seen: dict[str, int] = {}

    def on_one_thread() -> None:
        q4_native.keep_torch_on_one_thread()
        seen["before"] = torch.get_num_threads()
        seen["pool"] = library.work_pool_threads()  # the pool's own count is never touched
        with q4_native.torch_threads_of_pool():
            seen["inside"] = torch.get_num_threads()
        seen["after"] = torch.get_num_threads()
        q4_native.set_threads(4)
        library.work_pool_set_threads(2)
        with q4_native.torch_threads_of_pool():
            seen["inside, torch above the pool"] = torch.get_num_threads()

    with _pool_threads(2):
        thread = threading.Thread(target=on_one_thread)
        thread.start()
        thread.join()
    assert seen == {
        "before": 1,
        "pool": 2,
        "inside": 2,
        "after": 1,
        "inside, torch above the pool": 4,
    }


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
