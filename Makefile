# Quickstart targets: `make run` serves the default model, `make test` runs the test suite
# (`make test-gpu`: the GPU tests, on a machine with CUDA).
.PHONY: setup setup-test run test test-gpu lint

setup:
	./scripts/setup.sh server

setup-test:
	./scripts/setup.sh server,test

run: setup
	.venv/bin/worker-orcd serve $(ARGS)

# Then again on the portable CPU path, as an AVX2-only CPU runs it: oneDNN capped at AVX2 refuses bf16 there
# too, ATen takes its AVX2 kernels (NOTES.md, issue 13). The subset covers every CPU matmul kind.
PORTABLE_TESTS = tests/test_cpu_matmul.py tests/test_cpu_paths.py tests/test_cpu_q8dot.py tests/test_models_real.py \
	tests/test_scheduler.py tests/test_server.py

test: setup-test
	.venv/bin/python -m pytest -m "not slow and not gpu" -q
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 WORKER_ORCD_CPU_KERNELS=portable \
		.venv/bin/python -m pytest -m "not slow and not gpu" -q $(PORTABLE_TESTS)

# every -m gpu test, on the GPU machine (no .venv there: bench/gpu_session.sh installs the carried .whl/ wheels)
test-gpu:
	bash bench/gpu_session.sh tests

lint:
	.venv/bin/ruff check .
