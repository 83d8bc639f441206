"""The replica's end of the engine process (engine_process.py): LLMEngine's contract (generate,
generate_choices, abort, compile_grammar, stats, health), with the model and its step loop in a
child process, so the replica's GIL serves only its event loop, Ray and tokenizing.

One thread ("engine-io") starts the child, then reads its messages: each step's outputs for
all rows arrive in one message, which it splits by request and hands to each caller's event
loop in one call per loop. If the child dies, every request in flight ends with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from serve_app.engine.output_streams import read_choices, read_outputs
from serve_app.engine.types import (
    Constraint,
    EngineStats,
    FinishReason,
    GrammarError,
    RequestOutput,
    SamplingParams,
)
from serve_app.engine.zygote import ForkedProcess, fork_engine

logger = logging.getLogger(__name__)

GRAMMAR_TIMEOUT_S = 10.0  # as LLMEngine's: a grammar still compiling after this answers 400
_STOP_TIMEOUT_S = 10.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding serve_app/


class EngineProcessError(RuntimeError):
    """The engine process failed to start (other than a ModelSourceError) or died."""


@dataclass(slots=True)
class _Pending:
    """A request in flight: where its outputs go, and enough to fail it if the child dies."""

    loop: asyncio.AbstractEventLoop
    put: Callable[[RequestOutput], None]
    num_prompt_tokens: int
    num_generated: int = 0


@dataclass(frozen=True, slots=True)
class RemoteGrammar:
    """A constraint the child has compiled (and cached); it compiles rows from it on add."""

    constraint: Constraint


class EngineClient:
    """LLMEngine's public contract, served by an engine process of its own.

    `generate()` yields RequestOutput deltas for one request, the last with a finish_reason;
    closing or cancelling it sends an abort, which the child applies before its next step.
    If the process dies, requests in flight end with finish_reason "error" and `is_alive`
    turns false; `is_stuck` when requests are pending and no step came back for too long.
    """

    def __init__(
        self,
        model_config: Any,
        cache_dir: Path,
        has_gpu: bool = True,
        zygote_socket: str | None = None,
        load_tokenizer: bool = True,
    ) -> None:
        """zygote_socket: a warm starter (zygote.py) to fork the engine process from, instead
        of starting a fresh Python (which imports torch and transformers again).
        load_tokenizer=False: no tokenizer here (`tokenizer` None), where another client of
        the same model (engine_pool.py) has one."""
        self._zygote_socket = zygote_socket if not has_gpu else None
        self._requests: dict[str, _Pending] = {}
        self._send_lock = threading.Lock()
        self._compiles: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[str | None]]] = {}
        self._call_ids = itertools.count()
        self._stats = EngineStats()
        self._last_message_at = time.monotonic()
        self._is_dead = False
        self._exit_message = ""
        self._process: subprocess.Popen[bytes] | ForkedProcess | None = None
        self._started = threading.Event()
        self._tokenizer_known = threading.Event()  # set by "tokenizer", or with _started
        self._start_error: BaseException | None = None
        self._info: dict[str, Any] = {}
        parent_end, child_end = socket.socketpair()
        self._conn = Connection(parent_end.detach())
        start = ("start", (model_config.model_dump(mode="json"), str(cache_dir), has_gpu))
        # The child's death signal follows the thread that started it: this thread lives as
        # long as the client does.
        self._thread = threading.Thread(
            target=self._run, args=(child_end, start), name="engine-io", daemon=True
        )
        self._thread.start()
        # The replica's tokenizer loads while the child loads its own and its weights (~3 s of
        # a cold start for Gemma-3's tokenizer).
        self._tokenizer_known.wait()
        self.tokenizer: Any = None
        if self._start_error is None and load_tokenizer:
            self.tokenizer = _tokenizer(self._info["tokenizer_class"], self._info["weights_dir"])
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error
        self.max_model_len: int = self._info["max_model_len"]
        self.vocab_size: int = self._info["vocab_size"]

    # ---- health and stats (any thread) --------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def is_alive(self) -> bool:
        process = self._process
        return not self._is_dead and process is not None and process.poll() is None

    @property
    def is_busy(self) -> bool:
        return bool(self._requests)

    def is_stuck(self, max_step_seconds: float) -> bool:
        """True when requests are pending and the child sent nothing for that long (it sends
        after every step, and about once a second when idle)."""
        return self.is_busy and time.monotonic() - self._last_message_at > max_step_seconds

    def stats(self) -> EngineStats:
        """As of the child's last step."""
        return self._stats

    def kill(self) -> None:
        """Ends a hung child now: its requests in flight then end with an error."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()

    def shutdown(self) -> None:
        self._send(("stop", None))
        if self._process is not None:
            try:
                self._process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._thread.join(timeout=_STOP_TIMEOUT_S)

    # ---- requests (the caller's event loop) ---------------------------------------------

    async def compile_grammar(
        self, constraint: Constraint, timeout_s: float = GRAMMAR_TIMEOUT_S
    ) -> RemoteGrammar:
        """Compiles the constraint in the child (cached there by content). Raises GrammarError
        if it is invalid or not done within timeout_s."""
        loop = asyncio.get_running_loop()
        call_id = next(self._call_ids)
        done: asyncio.Future[str | None] = loop.create_future()
        self._compiles[call_id] = (loop, done)
        self._send(("compile", (call_id, constraint)))
        try:
            error = await asyncio.wait_for(done, timeout_s)
        except TimeoutError as exc:
            raise GrammarError(
                f"the {constraint.kind} took over {timeout_s:g} s to compile; simplify it"
            ) from exc
        finally:
            self._compiles.pop(call_id, None)
        if error is not None:
            raise GrammarError(error)
        return RemoteGrammar(constraint)

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        grammar: RemoteGrammar | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if grammar is None and params.constraint is not None:
            await self.compile_grammar(params.constraint)
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._submit([(request_id, outputs.put_nowait)], prompt_ids, [params])
        async for output in read_outputs(outputs, lambda: self.abort(request_id)):
            yield output

    async def generate_choices(
        self,
        request_id: str,
        prompt_ids: list[int],
        choice_params: list[SamplingParams],
        grammar: RemoteGrammar | None = None,
    ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """n choices of one prompt ("{request_id}-{i}"), sent in one message so they share
        one prefill; yields (choice index, delta) as they come. Closing it aborts the rest."""
        ready: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

        def put_of(index: int) -> Callable[[RequestOutput], None]:
            return lambda output: ready.put_nowait((index, output))

        choice_ids = [f"{request_id}-{i}" for i in range(len(choice_params))]
        self._submit(
            [(choice_id, put_of(i)) for i, choice_id in enumerate(choice_ids)],
            prompt_ids,
            choice_params,
        )
        async for index, output in read_choices(ready, choice_ids, self.abort):
            yield index, output

    def _submit(
        self,
        sinks: list[tuple[str, Callable[[RequestOutput], None]]],
        prompt_ids: list[int],
        params: list[SamplingParams],
    ) -> None:
        loop = asyncio.get_running_loop()
        for request_id, put in sinks:  # registered first: outputs may come back at once
            self._requests[request_id] = _Pending(loop, put, len(prompt_ids))
        if not self._requests.keys() - {request_id for request_id, _ in sinks}:
            self._last_message_at = time.monotonic()  # was idle: the stuck clock starts now
        message = [(rid, prompt_ids, p) for (rid, _), p in zip(sinks, params, strict=True)]
        self._send(("add", message))
        if self._is_dead:  # died before or while sending: nobody else will fail these
            self._fail_all()

    def _send(self, message: tuple[str, Any]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:  # the child is gone; the reader fails what is in flight
            pass

    # ---- the engine-io thread -----------------------------------------------------------

    def _run(self, child_end: socket.socket, start: tuple[str, Any]) -> None:
        try:
            self._process = self._spawn(child_end)
            self._send(start)
            self._read()
        except BaseException as exc:  # noqa: BLE001  # reported to the constructor or in-flight
            logger.exception("engine process reader failed")
            self._exit_message = str(exc)
        finally:
            self._is_dead = True
            if not self._started.is_set():
                self._start_error = self._start_error or EngineProcessError(
                    f"the engine process exited while loading{self._exit_code()}"
                )
                self._set_started()
            self._reap()
            self._fail_all()

    def _reap(self) -> None:
        self.kill()
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(1.0)

    def _spawn(self, child_end: socket.socket) -> subprocess.Popen[bytes] | ForkedProcess:
        fd = child_end.fileno()
        if self._zygote_socket is not None:
            try:
                forked = fork_engine(self._zygote_socket, fd)
            except OSError as exc:  # the replica still starts, the slow way
                logger.warning("%s; starting a fresh engine process instead", exc)
            else:
                child_end.close()
                logger.info("engine process %d forked by the zygote", forked.pid)
                return forked
        path = os.environ.get("PYTHONPATH", "")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, path]))}
        command = [sys.executable, "-m", "serve_app.engine.engine_process", str(fd)]
        process = subprocess.Popen([*command, str(os.getpid())], pass_fds=(fd,), env=env)
        child_end.close()
        logger.info("engine process %d started", process.pid)
        return process

    def _read(self) -> None:
        while True:
            try:
                kind, arg = self._conn.recv()
            except (EOFError, OSError):
                return
            self._last_message_at = time.monotonic()
            if kind == "step":
                outputs, self._stats = arg
                self._dispatch(outputs)
            elif kind == "compiled":
                self._compiled(*arg)
            elif kind == "tokenizer":
                self._info = arg
                self._tokenizer_known.set()
            elif kind == "ready":
                self._info = arg
                self._set_started()
            elif kind == "failed":
                self._start_error = _load_error(*arg)
                self._set_started()

    def _set_started(self) -> None:
        """Loaded or failed: the constructor, waiting for either message, goes on."""
        self._tokenizer_known.set()
        self._started.set()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs to their requests: one call into each event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Pending, RequestOutput]]] = {}
        for output in outputs:
            pending = self._requests.get(output.request_id)
            if pending is None:  # already failed or never ours
                continue
            if output.is_finished:
                del self._requests[output.request_id]
            pending.num_generated = output.num_generated_tokens
            by_loop.setdefault(pending.loop, []).append((pending, output))
        for loop, items in by_loop.items():
            _call_in(loop, _deliver, items)

    def _compiled(self, call_id: int, error: str | None) -> None:
        entry = self._compiles.get(call_id)
        if entry is not None:
            loop, done = entry
            _call_in(loop, _resolve, done, error)

    def _fail_all(self) -> None:
        message = f"the engine process died{self._exit_code()}"
        failed = [
            RequestOutput(
                request_id,
                "",
                pending.num_prompt_tokens,
                pending.num_generated,
                FinishReason.ERROR,
                error=message,
            )
            for request_id, pending in list(self._requests.items())
        ]
        self._dispatch(failed)
        for call_id in list(self._compiles):
            self._compiled(call_id, message)

    def _exit_code(self) -> str:
        process = self._process
        code = process.poll() if process is not None else None
        detail = f" (exit code {code})" if code is not None else ""
        return detail + (f": {self._exit_message}" if self._exit_message else "")


def _tokenizer(class_path: tuple[str, str], weights_dir: str) -> Any:
    """The tokenizer class the child loads (serve_app/loading.py, load_tokenizer), by its name:
    AutoTokenizer reads the model's config, which imports torch and much of transformers
    (~2.9 s in a fresh replica, against ~0.8 s for the class itself, measured)."""
    module, name = class_path
    return getattr(importlib.import_module(module), name).from_pretrained(weights_dir)


def _call_in(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting there
        loop.call_soon_threadsafe(fn, *args)


def _deliver(items: list[tuple[_Pending, RequestOutput]]) -> None:
    for pending, output in items:
        pending.put(output)


def _resolve(done: asyncio.Future[str | None], error: str | None) -> None:
    if not done.done():
        done.set_result(error)


def _load_error(type_name: str, message: str) -> BaseException:
    """The child's load failure as the replica's own: a missing model stays a ModelSourceError
    (the replica stays up and answers 503)."""
    from serve_app.model_store import ModelSourceError

    if type_name == ModelSourceError.__name__:
        return ModelSourceError(message)
    return EngineProcessError(f"the engine process failed to load: {type_name}: {message}")
