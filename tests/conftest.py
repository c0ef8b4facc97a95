import os

# Triton kernels run on CPU through the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_configure(config):
    """On a machine already busy (load average >= its cores: other jobs, a stress test), torch runs on one
    thread. With a thread per core, every parallel op waits for a thread that another process holds off its
    core: decoding SmolLM2 measured 198-1,762 ms a token on 2 threads beside a busy loop, 68-96 ms on one
    (17 ms quiet). Results do not depend on the thread count; only the wall time would."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load >= cores:
        import torch

        torch.set_num_threads(1)
        config._worker_orcd_threads = f"torch threads 1 (load average {load:.1f} on {cores} cores)"


def pytest_report_header(config):
    return getattr(config, "_worker_orcd_threads", None)


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2_path():
    from worker_orcd.packaged import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def gemma3_path():
    from worker_orcd.packaged import gemma3_270m_path

    return gemma3_270m_path()


# The CPU matmul paths a served (<= 16-row) decode can take: what this CPU picks, and the portable path an
# AVX2 or ARM64 CPU takes (issue 13; forced here). "reference" is the float32 path the tests compare with.
CPU_KERNEL_PATHS = ["native", "portable"]
SERVED_PATHS = [pytest.param(("cpu", k), id=f"cpu-{k}") for k in CPU_KERNEL_PATHS] + [
    pytest.param(("cuda", "native"), id="cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module", params=SERVED_PATHS)
def served_device(request):
    """The device to load a model on, with the CPU kernels forced to this parameter's path while the module's
    tests of it run (models must be loaded inside, since kernels are chosen at load)."""
    from worker_orcd.quant import cpu_caps

    device, kernels = request.param
    asked = os.environ.get(cpu_caps.ENV, "auto")  # "native": whatever this run asks for (auto by default)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(cpu_caps.ENV, asked)  # restored after, whatever force sets
        cpu_caps.force(asked if kernels == "native" else kernels)
        try:
            yield device
        finally:
            cpu_caps.force(asked)
