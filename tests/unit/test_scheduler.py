"""The scheduler on its own: admission, the prefill budget, chunks, aborts. No model, no torch."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from serve_app.engine.scheduler import Scheduler
from serve_app.engine.sequence import Sequence, SequenceStatus
from serve_app.engine.types import FinishReason


def seq(request_id: str, num_prompt: int, num_cached: int = 0) -> Sequence:
    built = Sequence(
        request_id=request_id,
        prompt_ids=[sum(map(ord, request_id)) * 1000 + i for i in range(num_prompt)],  # distinct
        max_tokens=8,
        sampler=Any,  # type: ignore[arg-type]  # the scheduler never samples
        detokenizer=Any,  # type: ignore[arg-type]
        stop_matcher=Any,  # type: ignore[arg-type]
        sink=lambda _: None,
    )
    built.num_cached = num_cached or None  # None: looked up by the scheduler (finds nothing)
    if num_cached:
        built.num_computed = num_cached
    return built


def scheduler(max_num_seqs: int = 4, max_prefill_tokens: int = 32) -> Scheduler:
    def no_prefix(s: Sequence) -> None:
        s.num_cached = 0

    return Scheduler(
        max_num_seqs=max_num_seqs, max_prefill_tokens=max_prefill_tokens, lookup_prefix=no_prefix
    )


def ids(seqs: list[Sequence]) -> list[str]:
    return [s.request_id for s in seqs]


def test_the_scheduler_imports_no_torch() -> None:
    code = "import sys, serve_app.engine.scheduler; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_short_prompts_share_one_prefill_within_the_padded_budget() -> None:
    sched = scheduler(max_prefill_tokens=32)
    for request_id, length in [("a", 10), ("b", 6), ("c", 10), ("d", 3)]:
        sched.add(seq(request_id, length))
    plan = sched.schedule()
    # 3 rows padded to 10 = 30 tokens fit; a fourth would make 40.
    assert ids(plan.group) == ["a", "b", "c"] and plan.chunk is None
    assert all(s.status is SequenceStatus.PREFILLING for s in plan.group)
    assert ids(list(sched.waiting)) == ["d"]


def test_cached_tokens_do_not_count_against_the_budget() -> None:
    sched = scheduler(max_prefill_tokens=48)
    sched.add(seq("cached", 100, num_cached=96))
    sched.add(seq("fresh", 20))
    plan = sched.schedule()
    assert ids(plan.group) == ["cached", "fresh"]  # 4 and 20 tokens to compute: 2 x 20 padded
    assert sched.num_prompt_tokens == 120 and sched.num_cached_prompt_tokens == 96


def test_a_long_prompt_is_prefilled_a_chunk_per_iteration_and_then_runs() -> None:
    sched = scheduler(max_prefill_tokens=16)
    sched.add(seq("long", 40))
    spans = []
    while True:
        plan = sched.schedule()
        assert plan.chunk is not None and not plan.group
        spans.append((plan.chunk.start, plan.chunk.end))
        if plan.chunk.is_last:
            break
        assert sched.chunked is plan.chunk.seq
    assert spans == [(0, 16), (16, 32), (32, 40)] and sched.chunked is None
    sched.start_running([plan.chunk.seq])
    assert ids(sched.running) == ["long"] and sched.running[0].status is SequenceStatus.RUNNING


def test_a_long_prompt_waits_for_the_group_ahead_of_it() -> None:
    sched = scheduler(max_prefill_tokens=16)
    sched.add(seq("short", 5))
    sched.add(seq("long", 40))
    assert ids(sched.schedule().group) == ["short"]
    plan = sched.schedule()
    assert plan.chunk is not None and plan.chunk.seq.request_id == "long"


def test_admission_stops_at_max_num_seqs_counting_the_running_rows() -> None:
    sched = scheduler(max_num_seqs=2, max_prefill_tokens=64)
    for request_id in "abc":
        sched.add(seq(request_id, 4))
    first = sched.schedule().group
    sched.start_running(first)
    assert ids(first) == ["a", "b"] and sched.schedule().group == []
    first[0].finish_reason = FinishReason.STOP
    assert sched.free_finished() == [1]  # row 1 (b) stays
    assert ids(sched.schedule().group) == ["c"]


def test_aborts_leave_the_queue_and_the_chunk_at_once_and_rows_at_free() -> None:
    sched = scheduler(max_prefill_tokens=16)
    sched.add(seq("row", 4))
    sched.start_running(sched.schedule().group)
    sched.add(seq("long", 40))
    sched.schedule()  # its first chunk
    sched.add(seq("queued", 4))
    for request_id in ["row", "long", "queued", "unknown"]:
        sched.abort(request_id)
    aborted = sched.take_aborted()
    assert sorted(ids(aborted)) == ["long", "queued", "row"]
    assert sched.chunked is None and not sched.waiting and ids(sched.running) == ["row"]
    for s in aborted:
        s.finish_reason = FinishReason.ABORT
    assert sched.free_finished() == [] and not sched.has_requests


def test_clear_returns_every_unfinished_request_wherever_it_is() -> None:
    sched = scheduler(max_prefill_tokens=16)
    sched.add(seq("row", 4))
    sched.start_running(sched.schedule().group)
    sched.add(seq("prefilling", 4))
    sched.schedule()  # out of the queue, not yet a row: still the scheduler's
    sched.add(seq("queued", 4))
    assert sched.has_requests
    assert sorted(ids(sched.clear())) == ["prefilling", "queued", "row"]
    assert not sched.has_requests and not sched.running and not sched.waiting


def test_identical_prompts_count_once_against_the_budget() -> None:
    """n choices of one prompt share one prefill row, so they fit where n rows would not."""
    sched = scheduler(max_prefill_tokens=32)
    choices = [seq("n", 20) for _ in range(3)]
    for index, choice in enumerate(choices):
        choice.request_id = f"n-{index}"
        sched.add(choice)
    sched.add(seq("other", 20))
    assert ids(sched.schedule().group) == ["n-0", "n-1", "n-2"]  # 20 padded, not 60


def test_max_prefill_rows_prefills_a_burst_a_group_at_a_time() -> None:
    """16 short prompts at once fit one 256-token forward; capped at 4 rows, the first four get
    their first token after a forward of 4 (n choices of one prompt still share a row)."""
    sched = Scheduler(
        max_num_seqs=32,
        max_prefill_tokens=256,
        max_prefill_rows=4,
        lookup_prefix=lambda s: setattr(s, "num_cached", 0),
    )
    choices = [seq("n", 12) for _ in range(2)]
    for index, choice in enumerate(choices):
        choice.request_id = f"n-{index}"
        sched.add(choice)
    for number in range(14):
        sched.add(seq(f"r{number}", 12))
    groups = []
    while sched.waiting:
        group = sched.schedule().group
        groups.append(ids(group))
        sched.start_running(group)
    assert groups[0] == ["n-0", "n-1", "r0", "r1", "r2"]  # 4 distinct prompts
    assert [len(group) for group in groups] == [5, 4, 4, 3]
    uncapped = scheduler(max_num_seqs=32, max_prefill_tokens=256)
    for number in range(16):
        uncapped.add(seq(f"r{number}", 12))
    assert len(uncapped.schedule().group) == 16


def test_rows_after_leaving_moves_the_last_rows_into_the_freed_places() -> None:
    from serve_app.engine.scheduler import rows_after_leaving

    assert rows_after_leaving([True, False, True, True]) == [0, 3, 2]  # one row moves
    assert rows_after_leaving([False, False, True, True]) == [2, 3]
    assert rows_after_leaving([True, True, False, False]) == [0, 1]  # nothing moves
    assert rows_after_leaving([True, False, True, False, True]) == [0, 4, 2]
    assert rows_after_leaving([False]) == [] and rows_after_leaving([]) == []
    for stays in ([True, False] * 5, [False, True, True, False, False, True, True]):
        kept = rows_after_leaving(stays)
        assert sorted(kept) == [row for row, s in enumerate(stays) if s]
        assert all(old >= new for new, old in enumerate(kept))  # safe to move in place
