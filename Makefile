# Quickstart targets: `make run` serves the default model, `make test` runs the test suite.
.PHONY: setup setup-test run test lint

setup:
	./scripts/setup.sh server

setup-test:
	./scripts/setup.sh server,test

run: setup
	.venv/bin/worker-orcd serve $(ARGS)

test: setup-test
	.venv/bin/python -m pytest -m "not slow and not gpu" -q

lint:
	.venv/bin/ruff check .
