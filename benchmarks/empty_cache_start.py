"""Empty model cache to a serving service, per source tree, interleaved (A B, A B, ...): with
HOME at an empty folder (packages installed, nothing under ~/.cache/serve-app: no prepared
models, no built kernel), `serve-app pull --config config/serve.yaml`, then `serve-app run`
of it (the whole config, started as `make run` starts it) until GET /health answers 200.
Issue 12's target: pull + start <= 45 s. Prints and writes each run's pull and start seconds
and the medians per tree.

    .venv/bin/python benchmarks/empty_cache_start.py --trees /tmp/before . --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from peers import targets

from serve_app.ports import free_port


def one_run(tree: Path, out: Path, label: str) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="empty-home-"))
    env = {"HOME": str(home), "PYTHONPATH": str(tree)}
    config = yaml.safe_load((tree / "config/serve.yaml").read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config_path = out / f"{label}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        started = time.perf_counter()
        with (out / f"{label}-pull.log").open("wb") as log:
            subprocess.run(
                [str(targets.VENV_BIN / "serve-app"), "pull", "--config", str(config_path)],
                cwd=tree,
                env={**targets.child_env(), **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=600,
            )
        pulled = time.perf_counter()
        command = targets.serve_app_run(config_path)
        log_path = out / f"{label}-run.log"
        with targets.running(label, command, port, "", log_path, 600, env, cwd=tree) as server:
            start_s = server.ready_s
    finally:
        shutil.rmtree(home, ignore_errors=True)
    pull_s = pulled - started
    return {"pull_s": pull_s, "start_s": start_s, "total_s": pull_s + start_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/empty_cache_start"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trees = [tree.resolve() for tree in args.trees]
    runs: dict[str, list[dict[str, Any]]] = {str(tree): [] for tree in trees}
    for round_index in range(args.rounds):
        for index, tree in enumerate(trees):
            result = one_run(tree, args.out, f"r{round_index}-t{index}")
            runs[str(tree)].append(result)
            print(
                f"round {round_index} {tree}: pull {result['pull_s']:.1f} s + start "
                f"{result['start_s']:.1f} s = {result['total_s']:.1f} s",
                flush=True,
            )
    medians = {
        tree: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for tree, results in runs.items()
    }
    for tree, median in medians.items():
        print(f"median {tree}: " + ", ".join(f"{k} {v:.1f}" for k, v in median.items()))
    (args.out / "results.json").write_text(json.dumps({"runs": runs, "medians": medians}, indent=2))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
