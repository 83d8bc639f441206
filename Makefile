# The two commands README.md opens with. Both set up everything they need first.
.PHONY: run test lint bench

run:
	scripts/setup.sh
	.venv/bin/serve run config/serve.yaml

test:
	scripts/setup.sh --test
	.venv/bin/pytest

lint:
	.venv/bin/ruff check serve_app deployments tests benchmarks
	.venv/bin/mypy

bench:
	scripts/setup.sh --test
	.venv/bin/python benchmarks/serving.py
