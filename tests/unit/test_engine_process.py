"""The engine in a process of its own (EngineClient <-> engine_process.py) on the tiny Llama:
the same outputs as in-process, abort, grammar errors, and what a dead, hung or orphaned engine
process does."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import deployments.llm_server as llm_server_module
from serve_app.engine.engine_client import EngineClient
from serve_app.engine.grammar import GrammarError
from serve_app.engine.llm_engine import LLMEngine
from serve_app.engine.types import Constraint, RequestOutput, SamplingParams
from serve_app.openai_adapter import Admitted
from tests.processes import is_running, wait_until_gone
from tests.unit.conftest import tiny_model_config
from tests.unit.test_llm_server import call, make_server

PROMPTS = ["The capital of France is", "def main():", "héllo wörld 世界"]


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    built = EngineClient(
        tiny_model_config(tiny_model_dir, max_num_seqs=8), tmp_path_factory.mktemp("cache")
    )
    yield built
    built.shutdown()


def ids(engine: Any, text: str) -> list[int]:
    return list(engine.tokenizer(text)["input_ids"])


async def collect(engine: Any, request_id: str, text: str, **params: Any) -> list[RequestOutput]:
    stream = engine.generate(request_id, ids(engine, text), SamplingParams(**params))
    return [output async for output in stream]


def joined(outputs: list[RequestOutput]) -> str:
    return "".join(o.text for o in outputs)


async def both(
    client: Any, engine: LLMEngine, **params: Any
) -> tuple[list[list[RequestOutput]], list[list[RequestOutput]]]:
    async def run(target: Any) -> list[list[RequestOutput]]:
        return list(
            await asyncio.gather(
                *(collect(target, f"r{i}", p, **params) for i, p in enumerate(PROMPTS))
            )
        )

    return await asyncio.wait_for(run(client), 60), await asyncio.wait_for(run(engine), 60)


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.0, "max_tokens": 20},
        {"temperature": 1.0, "seed": 7, "max_tokens": 20},
        {"temperature": 0.0, "max_tokens": 8, "logprobs": 2},
        {"temperature": 0.0, "max_tokens": 30, "stop": ("e",)},
    ],
    ids=["greedy", "seeded", "logprobs", "stop"],
)
async def test_outputs_equal_the_in_process_engines(
    client: Any, engine: LLMEngine, params: dict[str, Any]
) -> None:
    remote, local = await both(client, engine, **params)
    for theirs, ours in zip(remote, local, strict=True):
        assert joined(theirs) == joined(ours)
        assert theirs[-1].finish_reason == ours[-1].finish_reason
        assert theirs[-1].num_generated_tokens == ours[-1].num_generated_tokens
        if "logprobs" in params:  # the same tokens; values equal to float noise
            mine, local_entries = entries(theirs), entries(ours)
            assert [e[:2] for e in mine] == [e[:2] for e in local_entries]
            assert [e[2] for e in mine] == pytest.approx([e[2] for e in local_entries], abs=1e-4)


def entries(outputs: list[RequestOutput]) -> list[tuple[int, list[int], float]]:
    """(token id, top ids, logprob) per generated token."""
    return [
        (e.token_id, [top[0] for top in e.top], e.logprob)
        for o in outputs
        for e in o.logprobs or []
    ]


async def test_n_choices_come_back_interleaved_and_seeded(client: Any) -> None:
    params = [SamplingParams(temperature=1.0, seed=3 + i, max_tokens=12) for i in range(3)]
    prompt = ids(client, PROMPTS[0])

    async def texts() -> dict[int, str]:
        out: dict[int, str] = {0: "", 1: "", 2: ""}
        async for index, output in client.generate_choices("n", prompt, params):
            out[index] += output.text
        return out

    first, second = await asyncio.wait_for(texts(), 60), await asyncio.wait_for(texts(), 60)
    assert first == second and len(set(first.values())) > 1


async def test_abort_frees_the_slot(client: Any) -> None:
    before = client.stats().num_aborted
    # ignore_eos: a sampled EOS among the first tokens would end the stream before the abort.
    endless = SamplingParams(max_tokens=400, ignore_eos=True)
    stream = client.generate("long", ids(client, "The"), endless)
    for _ in range(3):
        await stream.__anext__()
    await stream.aclose()
    for _ in range(200):
        stats = client.stats()
        if stats.num_running == 0 and stats.num_aborted == before + 1:
            break
        await asyncio.sleep(0.02)
    assert stats.num_running == 0 and stats.num_aborted == before + 1
    assert not client.is_busy


async def test_grammar_compiles_in_the_child_and_refusals_raise(client: Any) -> None:
    with pytest.raises(GrammarError):
        await client.compile_grammar(Constraint("json_schema", '{"type": "no-such-type"}'))
    constraint = Constraint("choice", json.dumps(["yes", "no"]))
    grammar = await asyncio.wait_for(client.compile_grammar(constraint), 30)
    params = SamplingParams(temperature=0.0, max_tokens=10, constraint=constraint)
    outputs = [o async for o in client.generate("g", ids(client, "Say"), params, grammar)]
    assert joined(outputs) in ("yes", "no")


@pytest.fixture()
def process_server(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Any]:
    server = make_server(str(tiny_model_dir), tmp_path, engine_process=True)
    assert isinstance(server.engine, EngineClient)
    yield server
    server.engine.shutdown()


async def stream_started(server: Any, max_tokens: int = 400) -> AsyncIterator[Any]:
    endless = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    stream = server.generate(dataclasses.replace(call(), sampling=endless))
    assert isinstance(await asyncio.wait_for(stream.__anext__(), 30), Admitted)
    await asyncio.wait_for(stream.__anext__(), 30)
    return stream


async def test_a_killed_engine_process_fails_in_flight_and_health(process_server: Any) -> None:
    stream = await stream_started(process_server)
    os.kill(process_server.engine.pid, signal.SIGKILL)
    rest = await asyncio.wait_for(_drain(stream), 30)
    assert rest[-1].finish_reason == "error" and "engine process died" in rest[-1].error
    with pytest.raises(RuntimeError, match="died"):
        process_server.check_health()
    after = [e async for e in process_server.generate(call())]  # refused, not left hanging
    assert len(after) == 1 and after[0].status_code == 503


async def test_a_hung_engine_process_fails_health_and_its_requests(
    process_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = await stream_started(process_server)
    pid = process_server.engine.pid
    os.kill(pid, signal.SIGSTOP)  # a step that never returns
    try:
        monkeypatch.setattr(llm_server_module, "_MAX_STEP_SECONDS", 0.5)
        await asyncio.sleep(1.0)
        with pytest.raises(RuntimeError, match="stuck"):
            process_server.check_health()  # and kills the hung process
        rest = await asyncio.wait_for(_drain(stream), 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # the engine process this test started
    assert rest[-1].finish_reason == "error"
    assert not process_server.engine.is_alive


async def _drain(stream: Any) -> list[Any]:
    return [event async for event in stream]


_PARENT = r"""
import sys
from pathlib import Path
from serve_app.engine.engine_client import EngineClient
from tests.unit.conftest import tiny_model_config
client = EngineClient(tiny_model_config(Path(sys.argv[1])), Path(sys.argv[2]))
print(client.pid, flush=True)
sys.stdin.read()  # until killed
"""


def test_sigkill_of_the_replica_leaves_no_engine_process(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    root = str(Path(__file__).resolve().parents[2])
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tiny_model_dir), str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert is_running(child_pid)
        parent.kill()  # SIGKILL: no cleanup code of the parent runs
        parent.wait(10)
        assert wait_until_gone(child_pid), "the engine process outlived its replica"
    finally:
        if parent.poll() is None:
            parent.kill()


async def test_missing_weights_in_the_engine_process_answer_503(tmp_path: Path) -> None:
    server = make_server(str(tmp_path / "absent-model"), tmp_path, engine_process=True)
    out = [event async for event in server.generate(call())]
    assert len(out) == 1 and out[0].status_code == 503 and "absent-model" in out[0].message
    server.check_health()  # does not raise: restarting would not bring the weights back


def test_the_tokenizer_is_announced_before_the_weights_load(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica loads its tokenizer while the child loads its own and the weights
    (engine_client.py): the "tokenizer" message must go out before either is read."""
    from transformers import AutoModelForCausalLM

    from serve_app.engine import engine_process
    from serve_app.loading import saved_tokenizer_class

    events: list[str] = []
    real_from_pretrained = AutoModelForCausalLM.from_pretrained

    def weights_loading(*args: Any, **kwargs: Any) -> Any:
        events.append("weights")
        return real_from_pretrained(*args, **kwargs)

    tokenizer_class = saved_tokenizer_class(tiny_model_dir)
    assert tokenizer_class is not None
    real_tokenizer_load = tokenizer_class.from_pretrained

    def tokenizer_loading(*args: Any, **kwargs: Any) -> Any:
        events.append("tokenizer loads")
        return real_tokenizer_load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", weights_loading)
    monkeypatch.setattr(tokenizer_class, "from_pretrained", tokenizer_loading)
    sent: list[tuple[str, Any]] = []

    def send(message: tuple[str, Any]) -> None:
        events.append(message[0])
        sent.append(message)

    config = tiny_model_config(tiny_model_dir).model_dump(mode="json")
    engine, info = engine_process.build(config, str(tmp_path), False, send)
    try:
        assert events == ["tokenizer", "tokenizer loads", "weights"]
        [(_, announced)] = sent
        assert announced["weights_dir"] == info["weights_dir"]
        cls = type(engine.tokenizer)
        assert cls is tokenizer_class
        assert announced["tokenizer_class"] == (cls.__module__, cls.__qualname__)
    finally:
        engine.shutdown()


def test_a_folder_that_names_no_tokenizer_class_is_loaded_by_autotokenizer(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Without a tokenizer_class in tokenizer_config.json the class is known only once
    AutoTokenizer has chosen it: the replica hears it then, and gets the same class."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from serve_app.loading import load_tokenizer, saved_tokenizer_class

    folder = tmp_path / "no-class"
    shutil.copytree(tiny_model_dir, folder)
    config_path = folder / "tokenizer_config.json"
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "tokenizer_class": None})
    )
    assert saved_tokenizer_class(folder) is None
    heard: list[tuple[Path, type]] = []
    tokenizer = load_tokenizer(folder, lambda directory, cls: heard.append((directory, cls)))
    assert heard == [(folder, type(tokenizer))]
    assert type(tokenizer) is type(AutoTokenizer.from_pretrained(folder))
    assert (
        tokenizer("hello world")["input_ids"]
        == AutoTokenizer.from_pretrained(folder)("hello world")["input_ids"]
    )
