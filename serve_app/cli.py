"""`serve-app` command line: pull, run, deploy, status, models, chat, bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from serve_app.client import DEFAULT_URL
from serve_app.config import ModelConfig, app_config_from_serve_config

DEFAULT_CONFIG = "config/serve.yaml"
REPO_ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.INFO if args.command == "pull" else logging.WARNING  # keep chat output clean
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "pull":
        return pull_models(args.config)
    if args.command == "run":
        from serve_app.haproxy_front import serve_run_env

        beside = Path(sys.executable).parent / "serve"  # the venv's, whatever PATH says
        serve = str(beside) if beside.exists() else "serve"
        env = serve_run_env(config_path=Path(args.config))
        os.execvpe(serve, [serve, "run", args.config], env)
    if args.command == "deploy":
        os.execvp("serve", ["serve", "deploy", "--address", args.address, args.config])
    if args.command == "status":
        from serve_app.client import print_status

        return print_status(args.url)
    if args.command == "models":
        from serve_app.models_client import models_command

        return models_command(args.url, args.action, args)
    if args.command == "chat":
        from serve_app.client import chat_loop

        settings = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        return chat_loop(args.url, args.model, args.system, settings)
    passed = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    bench = [sys.executable, str(REPO_ROOT / "benchmarks" / "serving.py"), *passed]
    os.execv(sys.executable, bench)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="serve-app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    pull = commands.add_parser("pull", help="resolve and convert every model in the config")
    pull.add_argument("--config", default=DEFAULT_CONFIG)
    run = commands.add_parser("run", help="serve the config locally (serve run, HAProxy in front)")
    run.add_argument("--config", default=DEFAULT_CONFIG)
    deploy = commands.add_parser("deploy", help="deploy the config to a running Ray cluster")
    deploy.add_argument("--config", default=DEFAULT_CONFIG)
    deploy.add_argument("--address", default="http://127.0.0.1:8265", help="Ray dashboard")
    status = commands.add_parser("status", help="models, load, replicas and health")
    status.add_argument("--url", default=DEFAULT_URL)
    _models_parser(commands)
    chat = commands.add_parser("chat", help="terminal chat that streams the reply")
    chat.add_argument("--url", default=DEFAULT_URL)
    chat.add_argument("--model", default="smollm2-135m-instruct")
    chat.add_argument("--system", default=None)
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.add_argument("--temperature", type=float, default=None)
    bench = commands.add_parser("bench", help="benchmarks/serving.py (args passed through)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def _models_parser(commands: Any) -> None:
    models = commands.add_parser("models", help="list, add, remove, load, unload models")
    models.add_argument("--url", default=DEFAULT_URL)
    actions = models.add_subparsers(dest="action", required=True)
    actions.add_parser("ls", help="each model's status, idle timeout and source")
    add = actions.add_parser("add", help="a new model (same fields as a config entry)")
    add.add_argument("model_id", nargs="?", default=None)
    add.add_argument("--file", help="a model entry as in config/serve.yaml (YAML or JSON)")
    add.add_argument("--kind", choices=["chat", "completion", "embedding"])
    add.add_argument("--source", help="pkg://..., pkg-assemble://..., hf://... or a path")
    add.add_argument("--idle-timeout-s", type=float, default=None)
    add.add_argument("--engine", help="engine options as JSON")
    add.add_argument("--deployment", help="deployment options as JSON")
    for action, text in (
        ("rm", "remove a model once its open streams end"),
        ("load", "bring an idle or unloaded model up; returns when it is ready"),
        ("unload", "scale a model to zero once its open streams end"),
    ):
        actions.add_parser(action, help=text).add_argument("model_id")


def pull_models(config_path: str) -> int:
    """Prepares every model of the config, each in a worker process of its own, up to one per
    core: a preparation is single-threaded Python (GGUF parse, tokenizer build), so on 2 cores
    SmolLM2's and Gemma's run side by side instead of one after the other. Where a model takes
    native weights, the C kernels are compiled too, beside the longest preparation, instead of
    by the first engines to start (~3.5 s of a core on their critical path here)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    from serve_app.model_store import wants_native_weights

    config = app_config_from_serve_config(config_path)
    cache_dir = Path(config.cache_dir)
    workers = max(1, min(len(config.models), os.cpu_count() or 1))
    failures = 0
    # Forked before tqdm starts its monitor thread: the workers inherit this process's imports.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        pending = {pool.submit(_prepare_one, model, cache_dir): model.id for model in config.models}
        if any(wants_native_weights(model) for model in config.models):
            pending[pool.submit(_build_kernels)] = "kernels"
        with tqdm(total=len(pending), desc="models", unit="job") as bar:
            for future in as_completed(pending):
                name = pending[future]
                path, seconds, error = future.result()
                bar.update()
                if name == "kernels" and error is not None:  # the engines fall back to torch
                    tqdm.write(f"skip   kernels: {error}")
                elif error is not None:
                    failures += 1
                    tqdm.write(f"FAILED {name}: {error}")
                else:
                    tqdm.write(f"ready  {name} ({seconds:.1f}s) -> {path}")
    return 1 if failures else 0


def _prepare_one(model: ModelConfig, cache_dir: Path) -> tuple[Path | None, float, str | None]:
    """One model's preparation in a pull worker: (folder, seconds, None) or the source error's
    message (another exception propagates and fails the pull, as it would in one process)."""
    from serve_app.model_store import ModelSourceError, prepare_weights

    started = time.monotonic()
    try:
        path = prepare_weights(model, cache_dir)
    except ModelSourceError as exc:
        return None, time.monotonic() - started, str(exc)
    return path, time.monotonic() - started, None


def _build_kernels() -> tuple[Path | None, float, str | None]:
    """The native layers' C library, compiled into the kernel cache the engines load it from:
    (its path, seconds, None), or why it is not used on this machine."""
    from serve_app.engine.q4_native import q4_kernel

    started = time.monotonic()
    library = q4_kernel()
    if library is None:
        return None, time.monotonic() - started, "no C kernels here (native layers use torch's)"
    return Path(library._name), time.monotonic() - started, None


if __name__ == "__main__":
    sys.exit(main())
