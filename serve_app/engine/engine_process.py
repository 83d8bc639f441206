"""The engine's own process: builds the replica's LLMEngine the usual way (serve_app/loading.py)
and runs its step loop here, away from the replica's GIL; engine_client.py is the replica's end.

Started as `python -m serve_app.engine.engine_process FD PARENT_PID`; FD is this end of a socket
pair carrying pickled tuples (multiprocessing.connection framing). In, from the replica:
  ("start", (model config dict, cache dir, has_gpu))           first, once
  ("add", [(request_id, prompt_ids, SamplingParams), ...])      one request, or n choices
  ("abort", request_id) | ("compile", (call_id, Constraint)) | ("stop", None)
Out, to the replica:
  ("tokenizer", {weights_dir, tokenizer_class})  once its tokenizer's class is known (before
                                     it loads), so the replica loads its own meanwhile
  ("ready", {...}) or ("failed", (error type name, message))    once, after loading
  ("step", (outputs, EngineStats))   after every loop iteration: all rows' new outputs in one
                                     message (and, idle, a heartbeat about once a second); also
                                     after a prefill a decode step follows (first tokens)
  ("compiled", (call_id, error message or None))
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from serve_app.engine.types import Constraint, FinishReason, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PARENT_POLL_S = 1.0


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux prctl), and as a fallback exit when
    the parent pid changes (reparented): a SIGKILLed replica leaves no engine behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the poll below still ends it
        logger.warning("prctl(PR_SET_PDEATHSIG) unavailable; polling the parent pid")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class EngineServer:
    """Feeds the engine the replica's messages and sends back each step's outputs."""

    def __init__(self, engine: Any, conn: Connection) -> None:
        self.engine = engine
        self._conn = conn
        self._send_lock = threading.Lock()  # the inference thread and compile threads send
        self._outbox: list[RequestOutput] = []  # appended and taken on the inference thread
        self._compiles = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
        engine.on_step = self._flush

    def serve(self) -> None:
        """Handles messages until the replica says stop or its end of the socket closes."""
        while True:
            try:
                kind, arg = self._conn.recv()
            except (EOFError, OSError):
                return
            if kind == "add":
                self._add(arg)
            elif kind == "abort":
                self.engine.abort(arg)
            elif kind == "compile":
                self._compiles.submit(self._compile, *arg)
            elif kind == "stop":
                return

    def send(self, message: tuple[str, Any]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError:  # the replica is gone; serve() sees the closed socket and returns
            pass

    def _sink(self, output: RequestOutput) -> None:
        self._outbox.append(output)

    def _flush(self) -> None:
        outputs, self._outbox = self._outbox, []
        self.send(("step", (outputs, self.engine.stats())))

    def _add(self, requests: list[tuple[str, list[int], SamplingParams]]) -> None:
        try:
            group = [
                (request_id, prompt_ids, params, self._sink, self._grammar(params))
                for request_id, prompt_ids, params in requests
            ]
        except Exception as exc:  # compiled before it was sent: only if evicted and now refused
            self._fail(requests, f"the output constraint failed to compile: {exc}")
            return
        self.engine.submit_group(group)

    def _grammar(self, params: SamplingParams) -> Any:
        if params.constraint is None:
            return None
        return self.engine.grammars.compile(params.constraint)  # cached by compile_grammar

    def _fail(self, requests: list[tuple[str, list[int], SamplingParams]], message: str) -> None:
        outputs = [
            RequestOutput(request_id, "", len(prompt_ids), 0, FinishReason.ERROR, error=message)
            for request_id, prompt_ids, _ in requests
        ]
        self.send(("step", (outputs, self.engine.stats())))

    def _compile(self, call_id: int, constraint: Constraint) -> None:
        try:
            self.engine.grammars.compile(constraint)
            error = None
        except Exception as exc:  # GrammarError, or anything llguidance raises
            error = str(exc) or type(exc).__name__
        self.send(("compiled", (call_id, error)))

    def close(self) -> None:
        self.engine.shutdown()
        self._compiles.shutdown(wait=False, cancel_futures=True)


def build(
    model: dict[str, Any], cache_dir: str, has_gpu: bool, send: Callable[[Any], None]
) -> tuple[Any, dict[str, Any]]:
    """The engine, as the replica used to build it, and what the replica needs to know of it.
    The tokenizer's part is sent as soon as it is known (the "tokenizer" message)."""
    from serve_app.config import ModelConfig
    from serve_app.loading import build_llm_engine

    tokenizer_info: dict[str, Any] = {}

    def on_tokenizer(weights_dir: Path, tokenizer_class: type) -> None:
        tokenizer_info.update(
            weights_dir=str(weights_dir),
            tokenizer_class=(tokenizer_class.__module__, tokenizer_class.__qualname__),
        )
        send(("tokenizer", tokenizer_info))

    config = ModelConfig.model_validate(model)
    engine = build_llm_engine(config, Path(cache_dir), has_gpu, on_tokenizer)
    info = {
        **tokenizer_info,
        "max_model_len": engine.max_model_len,
        "vocab_size": engine.vocab_size,
        "pid": os.getpid(),
    }
    return engine, info


def die_with(pid: int) -> None:
    """Exit when process `pid` (not a parent: the zygote forked this one) exits. A pidfd turns
    readable when that process ends, so a reused pid cannot keep this one alive."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)

    def watch() -> None:
        select.select([pidfd], [], [])
        os._exit(1)

    threading.Thread(target=watch, name="replica-watch", daemon=True).start()


def main(fd: int, parent_pid: int, forked: bool = False) -> None:
    """`parent_pid` is the replica's; `forked` when the zygote (zygote.py) started this process,
    which is then not the replica's child."""
    if forked:
        die_with(parent_pid)
    else:
        die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    conn = Connection(fd)
    kind, (model, cache_dir, has_gpu) = conn.recv()
    try:
        engine, info = build(model, cache_dir, has_gpu, conn.send)
    except Exception as exc:  # the replica raises it again (ModelSourceError: 503 per model)
        logger.exception("engine failed to load")
        conn.send(("failed", (type(exc).__name__, str(exc))))
        return
    server = EngineServer(engine, conn)
    server.send(("ready", info))
    try:
        server.serve()
    finally:
        server.close()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
    sys.stdout.flush()
    os._exit(0)  # daemon threads (grammar warm-up, compiles) must not hold the exit
