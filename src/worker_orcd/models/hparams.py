"""Reading architecture hyperparameters from GGUF metadata, each checked once at load."""

from __future__ import annotations

from typing import Any

import numpy as np

from worker_orcd.gguf import GGUFError, GGUFFile


class HParams:
    """Typed access to '<arch>.<suffix>' keys; errors name the key."""

    def __init__(self, f: GGUFFile):
        self.f = f
        self.arch = f.architecture

    def _key(self, suffix: str) -> str:
        return f"{self.arch}.{suffix}"

    def _raw(self, suffix: str, default: Any) -> Any:
        v = self.f.get(self._key(suffix), default)
        if isinstance(v, np.ndarray):
            return v
        return v

    def int(self, suffix: str, default: int | None = None, minimum: int = 1) -> int:
        v = self._raw(suffix, default)
        if v is None:
            raise GGUFError(self.f.path, f"required metadata {self._key(suffix)} is missing", self._key(suffix))
        if isinstance(v, np.ndarray):  # some converters write per-layer arrays; all equal here
            if v.size == 0 or not (v == v.flat[0]).all():
                raise GGUFError(self.f.path, f"{self._key(suffix)} varies per layer; not supported", self._key(suffix))
            v = v.flat[0]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < minimum:
            raise GGUFError(self.f.path, f"{self._key(suffix)} must be an integer >= {minimum}, got {v!r}",
                            self._key(suffix))
        return int(v)

    def float(self, suffix: str, default: float | None = None, positive: bool = True) -> float:
        v = self._raw(suffix, default)
        if v is None:
            raise GGUFError(self.f.path, f"required metadata {self._key(suffix)} is missing", self._key(suffix))
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise GGUFError(self.f.path, f"{self._key(suffix)} must be a number, got {v!r}", self._key(suffix))
        v = float(v)
        if not np.isfinite(v) or (positive and v <= 0):
            raise GGUFError(self.f.path, f"{self._key(suffix)} must be finite and > 0, got {v}", self._key(suffix))
        return v

    def str(self, suffix: str, default: str | None = None) -> str | None:
        v = self._raw(suffix, default)
        if v is not None and not isinstance(v, str):
            raise GGUFError(self.f.path, f"{self._key(suffix)} must be a string, got {v!r}", self._key(suffix))
        return v

    def has(self, suffix: str) -> bool:
        return self._key(suffix) in self.f.metadata

    def require(self, ok: bool, what: str) -> None:
        if not ok:
            raise GGUFError(self.f.path, f"invalid hyperparameters: {what}")
