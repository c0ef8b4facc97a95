"""QuantTensor: a tensor kept in its ggml block format on a device, expanded only where it is used."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as GGMLType

from worker_orcd.quant.formats import dequantize, row_bytes, tensor_bytes
from worker_orcd.quant.packed import PackedWeight, pack, unpack

MatmulKernel = Callable[["QuantTensor", torch.Tensor], torch.Tensor]

# device type -> matmul for that device; faster paths (fused GPU kernels, CPU int kernels) register here
MATMUL_KERNELS: dict[str, MatmulKernel] = {}


class QuantTensor:
    """Blocks resident on a device: the ggml bytes uint8 [rows, bytes_per_row] (rows as in the file), or only
    their lossless repacking for the GPU kernels (`packed`, quant/packed.py) once `pack_resident` dropped them."""

    def __init__(self, raw: torch.Tensor | None, ggml_type: GGMLType, shape: tuple[int, ...],
                 packed: PackedWeight | None = None):
        shape = tuple(int(d) for d in shape)
        per_row = row_bytes(ggml_type, shape)
        rows = math.prod(shape[:-1])
        if raw is None and (packed is None or packed.codes.shape[0] != rows):
            raise ValueError(f"a QuantTensor without raw blocks needs a packed weight of {rows} rows")
        if raw is not None and (raw.dtype != torch.uint8 or tuple(raw.shape) != (rows, per_row)):
            raise ValueError(
                f"{GGMLType(ggml_type).name} tensor of shape {shape} needs uint8 raw [{rows}, {per_row}], "
                f"got {raw.dtype} {list(raw.shape)}"
            )
        self._raw = raw
        self.packed = packed
        self.ggml_type = GGMLType(ggml_type)
        self.shape = shape

    @property
    def raw(self) -> torch.Tensor:
        """The ggml blocks (rebuilt from `packed`, bit for bit, when only that is resident)."""
        return self._raw if self._raw is not None else unpack(self.packed)

    def pack_resident(self) -> QuantTensor:
        """Keep only the GPU kernels' layout (same bytes as the blocks): one copy of the weight in VRAM."""
        if self.packed is None:
            self.packed = pack(self._raw, self.ggml_type, self.shape)
        if self.packed is not None:
            self._raw = None
        return self

    def stacked(self, i: int) -> QuantTensor:
        """Matrix i of a stacked [n, rows, cols] tensor (an expert), as a view of the same storage."""
        n, rows, cols = self.shape
        if self._raw is None:
            return QuantTensor(None, self.ggml_type, (rows, cols), self.packed.rows(i * rows, (i + 1) * rows))
        return QuantTensor(self._raw[i * rows : (i + 1) * rows], self.ggml_type, (rows, cols))

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
        return tensor_bytes(self.ggml_type, self.shape)

    @property
    def device(self) -> torch.device:
        return self._raw.device if self._raw is not None else self.packed.codes.device

    def to(self, device: torch.device | str) -> QuantTensor:
        return QuantTensor(self.raw.to(device), self.ggml_type, self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full tensor of `shape`, on the same device."""
        return dequantize(self.raw, self.ggml_type, self.shape).to(dtype)

    def matmul(self, x: torch.Tensor, out_dtype: torch.dtype | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., in] @ W.T (+ bias) -> [..., out] in x.dtype (or out_dtype), for a 2-D W of shape (out, in).
        A bias goes to kernels that take it (CUDA: inside the split-K sum); elsewhere it is added to the result."""
        self._need_2d("matmul")
        if x.shape[-1] != self.shape[1]:
            raise ValueError(f"matmul: x has {x.shape[-1]} features, weight {self.shape} has {self.shape[1]}")
        kernel = MATMUL_KERNELS.get(self.device.type, dequantize_matmul)
        if bias is not None and getattr(kernel, "takes_bias", False):
            return kernel(self, x, out_dtype=out_dtype, bias=bias)
        if bias is not None:
            y = self.matmul(x, out_dtype)
            return y.add_(bias) if y.dtype != bias.dtype else y + bias
        if out_dtype is not None and out_dtype != x.dtype and getattr(kernel, "takes_out_dtype", False):
            return kernel(self, x, out_dtype=out_dtype)
        y = kernel(self, x)
        return y if out_dtype is None else y.to(out_dtype)

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
        flat = ids.reshape(-1).to(self.device, torch.int64)
        rows = self._raw[flat] if self._raw is not None else unpack(self.packed.take(flat))
        out = dequantize(rows, self.ggml_type, (rows.shape[0], self.shape[1]))
        return out.reshape(*ids.shape, self.shape[1])

    def _need_2d(self, op: str) -> None:
        if len(self.shape) != 2:
            raise ValueError(f"{op} needs a 2-D tensor, this {self.ggml_type.name} has shape {self.shape}")

    def __repr__(self) -> str:
        return f"QuantTensor({self.ggml_type.name}, shape={self.shape}, device={self.device})"


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
