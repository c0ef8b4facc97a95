"""QuantTensor: a tensor kept in its ggml block format on a device, expanded only where it is used."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as GGMLType

from worker_orcd.quant.formats import dequantize, row_bytes, tensor_bytes

MatmulKernel = Callable[["QuantTensor", torch.Tensor], torch.Tensor]

# device type -> matmul for that device; faster paths (fused GPU kernels, CPU int kernels) register here
MATMUL_KERNELS: dict[str, MatmulKernel] = {}


class QuantTensor:
    """Raw blocks resident on a device: uint8 [rows, bytes_per_row], rows as in the file (row-major)."""

    def __init__(self, raw: torch.Tensor, ggml_type: GGMLType, shape: tuple[int, ...]):
        shape = tuple(int(d) for d in shape)
        per_row = row_bytes(ggml_type, shape)
        rows = math.prod(shape[:-1])
        if raw.dtype != torch.uint8 or tuple(raw.shape) != (rows, per_row):
            raise ValueError(
                f"{GGMLType(ggml_type).name} tensor of shape {shape} needs uint8 raw [{rows}, {per_row}], "
                f"got {raw.dtype} {list(raw.shape)}"
            )
        self.raw = raw
        self.ggml_type = GGMLType(ggml_type)
        self.shape = shape

    @classmethod
    def from_bytes(
        cls,
        data: np.ndarray | torch.Tensor,
        ggml_type: GGMLType,
        shape: tuple[int, ...],
        device: torch.device | str = "cpu",
    ) -> QuantTensor:
        """Wrap a whole tensor's bytes (numpy or torch uint8, any shape) and move them to `device`."""
        shape = tuple(int(d) for d in shape)
        if isinstance(data, np.ndarray):
            if data.dtype != np.uint8:
                raise ValueError(f"raw bytes must be uint8, got numpy {data.dtype}")
            data = _from_numpy(data, torch.device(device))
        expected = tensor_bytes(ggml_type, shape)
        if data.dtype != torch.uint8:
            raise ValueError(f"raw bytes must be uint8, got {data.dtype}")
        if data.numel() != expected:
            name = GGMLType(ggml_type).name
            raise ValueError(f"{name} tensor of shape {shape} needs {expected} bytes, got {data.numel()}")
        rows = math.prod(shape[:-1])
        raw = data.to(device).contiguous().reshape(rows, row_bytes(ggml_type, shape))
        return cls(raw, ggml_type, shape)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def device(self) -> torch.device:
        return self.raw.device

    def to(self, device: torch.device | str) -> QuantTensor:
        return QuantTensor(self.raw.to(device), self.ggml_type, self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full tensor of `shape`, on the same device."""
        return dequantize(self.raw, self.ggml_type, self.shape).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] @ W.T -> [..., out] in x.dtype, for a 2-D W of shape (out, in)."""
        self._need_2d("matmul")
        if x.shape[-1] != self.shape[1]:
            raise ValueError(f"matmul: x has {x.shape[-1]} features, weight {self.shape} has {self.shape[1]}")
        return MATMUL_KERNELS.get(self.raw.device.type, dequantize_matmul)(self, x)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) of a 2-D tensor -> float32 [*ids.shape, cols]; only those rows expand."""
        self._need_2d("embedding")
        ids = torch.as_tensor(ids)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"embedding ids must be integers, got {ids.dtype}")
        if ids.device.type == "cpu" and ids.numel():
            # CPU ids only: checking GPU ids would sync every step (torch's index check still asserts there)
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.shape[0]:
                raise ValueError(f"embedding ids must be in [0, {self.shape[0]}), got {lo}..{hi}")
        rows = self.raw[ids.reshape(-1).to(self.raw.device, torch.int64)]
        out = dequantize(rows, self.ggml_type, (rows.shape[0], self.shape[1]))
        return out.reshape(*ids.shape, self.shape[1])

    def _need_2d(self, op: str) -> None:
        if len(self.shape) != 2:
            raise ValueError(f"{op} needs a 2-D tensor, this {self.ggml_type.name} has shape {self.shape}")

    def __repr__(self) -> str:
        return f"QuantTensor({self.ggml_type.name}, shape={self.shape}, device={self.raw.device})"


def _from_numpy(data: np.ndarray, device: torch.device) -> torch.Tensor:
    """numpy bytes -> torch bytes that `device` can take without aliasing the file."""
    if device.type == "cpu":  # own copy: a file's mmap may be closed while the tensor lives
        return torch.from_numpy(np.array(data, copy=True))
    with warnings.catch_warnings():  # aliased only until the copy to `device`, never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(data))


def dequantize_matmul(w: QuantTensor, x: torch.Tensor) -> torch.Tensor:
    """Reference path for every device: expand W in x's dtype, then one matmul."""
    return x @ w.dequantize(x.dtype).T
