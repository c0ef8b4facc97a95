"""worker-orcd: a GPU inference worker serving one GGUF model.

`import worker_orcd` stays light: torch and the model code load on first use of `load`, and the
server's dependencies only from `worker_orcd.server`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "load_tokenizer", "__version__"]


def load(path: Any = None, device: Any = "auto", progress: Any = None, mmap: bool | None = None) -> Any:
    """Load a GGUF model; see `worker_orcd.api.load`."""
    from worker_orcd.api import load as _load

    return _load(path, device, progress, mmap=mmap)


def load_tokenizer(path: Any) -> Any:
    """A tokenizer from a GGUF file (vocab-only too) or a tokenizer.json; see `worker_orcd.tokenizer`."""
    from worker_orcd.tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path)
