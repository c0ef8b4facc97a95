# Quickstart targets: `make run` serves the default model, `make test` runs the test suite
# (`make test-gpu`: the GPU tests, on a machine with CUDA).
.PHONY: setup setup-test run test test-gpu lint

setup:
	./scripts/setup.sh server

setup-test:
	./scripts/setup.sh server,test

run: setup
	.venv/bin/worker-orcd serve $(ARGS)

test: setup-test
	.venv/bin/python -m pytest -m "not slow and not gpu" -q

# every -m gpu test, on the GPU machine (no .venv there: bench/gpu_session.sh installs the carried .whl/ wheels)
test-gpu:
	bash bench/gpu_session.sh tests

lint:
	.venv/bin/ruff check .
