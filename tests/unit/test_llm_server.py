"""The model deployment's shim without Ray: admission, refusals, health when the engine fails."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import deployments.llm_server as llm_server_module
from deployments.llm_server import LLMServer
from serve_app.engine.types import RequestOutput, SamplingParams
from serve_app.openai_adapter import Admitted, GenerateCall, Rejected
from tests.unit.conftest import tiny_model_config

ServerClass: Any = LLMServer.func_or_class  # the plain class under @serve.deployment


def make_server(source: str, tmp_path: Path, engine_process: bool = False) -> Any:
    """The replica's class; its engine in this process (tests reach into it) unless asked."""
    config = tiny_model_config(Path(source)).model_dump(mode="json")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(llm_server_module.ENGINE_PROCESS_ENV, "1" if engine_process else "0")
        return ServerClass(config, str(tmp_path))


def call(max_tokens: int = 8, **fields: Any) -> GenerateCall:
    return GenerateCall(
        request_id=fields.pop("request_id", "r1"),
        endpoint=fields.pop("endpoint", "chat"),
        sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens),
        messages=fields.pop("messages", [{"role": "user", "content": "hello"}]),
        **fields,
    )


async def events(server: Any, generate_call: GenerateCall) -> list[Any]:
    return [event async for event in server.generate(generate_call)]


async def test_admits_then_streams_then_finishes(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = make_server(str(tiny_model_dir), tmp_path)
    out = await events(server, call())
    assert isinstance(out[0], Admitted) and out[0].num_prompt_tokens > 0
    assert all(isinstance(e, RequestOutput) for e in out[1:]) and out[-1].is_finished
    server.engine.shutdown()


async def test_context_overflow_is_rejected_before_any_token(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = make_server(str(tiny_model_dir), tmp_path)
    out = await events(server, call(max_tokens=10_000))
    assert len(out) == 1 and isinstance(out[0], Rejected)
    assert out[0].status_code == 400 and out[0].code == "context_length_exceeded"
    assert "512" in out[0].message
    server.engine.shutdown()


async def test_missing_weights_keep_the_replica_up_and_answer_503(tmp_path: Path) -> None:
    server = make_server(str(tmp_path / "absent-model"), tmp_path)
    out = await events(server, call())
    assert len(out) == 1 and isinstance(out[0], Rejected) and out[0].status_code == 503
    assert "absent-model" in out[0].message
    assert (await server.info())["ready"] is False
    server.check_health()  # does not raise: restarting would not bring the weights back


async def test_a_prefill_failing_before_any_token_ends_the_stream_with_its_error(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = make_server(str(tiny_model_dir), tmp_path)

    def failing_prefill(*_: object) -> None:
        raise RuntimeError("simulated prefill failure")

    # The engine loop catches the failure and fails the request.
    server.engine.runner.prefill = failing_prefill  # type: ignore[method-assign]
    out = await asyncio.wait_for(events(server, call()), timeout=30)  # never left hanging
    assert isinstance(out[0], Admitted)
    last = out[-1]
    assert last.finish_reason == "error" and last.num_generated_tokens == 0
    assert "simulated prefill failure" in last.error


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_dead_inference_thread_fails_in_flight_and_health(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = make_server(str(tiny_model_dir), tmp_path)
    engine = server.engine

    def die() -> None:
        raise SystemExit("simulated crash of the inference thread")

    stream = server.generate(call(max_tokens=400))
    assert isinstance(await stream.__anext__(), Admitted)
    await stream.__anext__()
    engine._decode = die  # type: ignore[method-assign]  # SystemExit escapes the loop
    rest = [e async for e in stream]
    assert rest[-1].finish_reason == "error"  # an error, not silence
    for _ in range(100):
        if not engine.is_alive:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError, match="died"):
        server.check_health()


async def test_hung_step_fails_health(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_server(str(tiny_model_dir), tmp_path)
    engine = server.engine
    real_step = engine._decode

    def slow_step() -> None:
        time.sleep(1.5)
        real_step()

    monkeypatch.setattr(llm_server_module, "_MAX_STEP_SECONDS", 0.5)
    engine._decode = slow_step  # type: ignore[method-assign]
    task = asyncio.ensure_future(events(server, call(max_tokens=3)))
    await asyncio.sleep(1.0)
    with pytest.raises(RuntimeError, match="stuck"):
        server.check_health()
    await task
    server.check_health()  # healthy again once steps come back
    engine.shutdown()
