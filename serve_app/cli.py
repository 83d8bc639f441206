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
from serve_app.config import app_config_from_serve_config

DEFAULT_CONFIG = "config/serve.yaml"
REPO_ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.INFO if args.command == "pull" else logging.WARNING  # keep chat output clean
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "pull":
        return pull_models(args.config)
    if args.command == "run":
        os.execvp("serve", ["serve", "run", args.config])
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
    run = commands.add_parser("run", help="serve the config locally (serve run)")
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
    from tqdm import tqdm

    from serve_app.model_store import ModelSourceError, prepare_weights

    config = app_config_from_serve_config(config_path)
    failures = 0
    with tqdm(config.models, desc="models", unit="model") as bar:
        for model in bar:
            bar.set_postfix_str(model.id)
            started = time.monotonic()
            try:
                path = prepare_weights(model, Path(config.cache_dir))
            except ModelSourceError as exc:
                failures += 1
                tqdm.write(f"FAILED {model.id}: {exc}")
                continue
            tqdm.write(f"ready  {model.id} ({time.monotonic() - started:.1f}s) -> {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
