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
