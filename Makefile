# The two commands README.md opens with. Both set up everything they need first.
.PHONY: run test smoke lint bench

run:
	scripts/setup.sh
	.venv/bin/serve-app run --config config/serve.yaml

test:
	scripts/setup.sh --test
	.venv/bin/pytest

# The run command from nothing in .venv-run (no test extras): what CI checks before `make test`.
smoke:
	scripts/smoke_run.sh

lint:
	.venv/bin/ruff check serve_app deployments tests benchmarks
	.venv/bin/mypy

bench:
	scripts/setup.sh --test
	.venv/bin/python benchmarks/serving.py
