"""`serve-app` command line: pull (prepare models ahead, with progress) and run (local)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from serve_app.config import app_config_from_serve_config

DEFAULT_CONFIG = "config/serve.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serve-app", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    pull = commands.add_parser("pull", help="resolve and convert every model in the config")
    pull.add_argument("--config", default=DEFAULT_CONFIG)
    run = commands.add_parser("run", help="serve the config locally (serve run)")
    run.add_argument("--config", default=DEFAULT_CONFIG)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "pull":
        return pull_models(args.config)
    os.execvp("serve", ["serve", "run", args.config])


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
