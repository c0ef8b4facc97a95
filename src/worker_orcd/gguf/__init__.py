"""Validated, memory-mapped GGUF reading."""

from worker_orcd.gguf.reader import GGUFError, GGUFFile, TensorRef, open_gguf

__all__ = ["GGUFError", "GGUFFile", "TensorRef", "open_gguf"]
