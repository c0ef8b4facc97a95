"""Moving GGUF tensors to the device: matrices stay in their block format, vectors become float32."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from worker_orcd.gguf import GGUFError, GGUFFile
from worker_orcd.quant import QuantTensor
from worker_orcd.quant.cpu_matmul import PACKED_MAX_ROWS
from worker_orcd.quant.formats import row_bytes
from worker_orcd.quant.packed import cat_rows

if TYPE_CHECKING:
    from worker_orcd.kernels.triton_quant import Partials

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
# CPU models with more tensor bytes than this stay memory-mapped by default (a copy would double what a
# 12 GB model costs); smaller ones are copied, so the file can be replaced or truncated under a running worker.
MMAP_ABOVE = 2**30


class Weights:
    """The tensors of one model on one device, looked up by GGUF name."""

    def __init__(self, f: GGUFFile, device: torch.device, progress: Progress | None = None,
                 mmap: bool | None = None):
        """`mmap` (CPU only): True aliases the file's read-only map (no copy, but a file truncated under the
        process then kills it with SIGBUS); False copies into process memory (the file may then change or
        go); None copies models up to MMAP_ABOVE bytes of tensors and maps bigger ones."""
        self.path = f.path
        self.device = device
        self._t: dict[str, QuantTensor | torch.Tensor] = {}
        total = sum(t.nbytes for t in f.tensors.values())
        self.mapped = device.type == "cpu" and (total > MMAP_ABOVE if mmap is None else mmap)
        done = 0
        for name, ref in f.tensors.items():
            raw = f.tensor_bytes(name)
            if len(ref.shape) == 1:  # norms, biases, rope factors: small, used in float32
                q = QuantTensor.from_bytes(raw, ref.ggml_type, ref.shape, device="cpu")
                self._t[name] = _finite(f.path, name, q.dequantize()).to(device)
            elif self.mapped:
                self._t[name] = _mapped(raw, ref.ggml_type, ref.shape)
            elif device.type == "cuda":  # the kernels' layout replaces the blocks: one copy in VRAM
                self._t[name] = QuantTensor.from_bytes(raw, ref.ggml_type, ref.shape, device=device).pack_resident()
            else:
                self._t[name] = QuantTensor.from_bytes(raw, ref.ggml_type, ref.shape, device=device)
            done += ref.nbytes
            if progress is not None:
                progress(done, total)

    def __contains__(self, name: str) -> bool:
        return name in self._t

    def get(self, name: str) -> QuantTensor | torch.Tensor | None:
        return self._t.get(name)

    def __getitem__(self, name: str) -> QuantTensor | torch.Tensor:
        try:
            return self._t[name]
        except KeyError:
            raise GGUFError(self.path, f"tensor {name} is required but missing") from None

    def vector(self, name: str) -> torch.Tensor:
        t = self[name]
        if not isinstance(t, torch.Tensor):
            raise GGUFError(self.path, f"tensor {name} must be 1-D, has shape {t.shape}")
        return t

    def matrix(self, name: str, shape: tuple[int, ...]) -> QuantTensor:
        t = self[name]
        if isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
            raise GGUFError(self.path, f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes if isinstance(t, QuantTensor) else t.numel() * t.element_size() for t in self._t.values())


def _finite(path: str, name: str, v: torch.Tensor) -> torch.Tensor:
    """A NaN or inf in a norm or bias reaches every activation: refuse the file, naming the tensor. Cheap for
    vectors, which are dequantized here anyway; `worker-orcd inspect --check-values` scans the matrices too."""
    if not bool(torch.isfinite(v).all()):
        nan, inf = int(torch.isnan(v).sum()), int(torch.isinf(v).sum())
        raise GGUFError(path, f"tensor {name} holds {nan} NaN and {inf} inf values", f"tensor {name}")
    return v


def _mapped(raw: np.ndarray, ggml_type, shape: tuple[int, ...]) -> QuantTensor:
    """A CPU QuantTensor over the memory-mapped file itself: no copy, pages shared with the page cache.

    The blocks are only ever read, so aliasing the read-only map is safe; a 12 GB model then costs
    no more resident memory than the pages a forward pass touches.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns that the buffer is read-only
        t = torch.from_numpy(raw)
    return QuantTensor(t.reshape(math.prod(shape[:-1]), row_bytes(ggml_type, shape)), ggml_type, shape)


def fuse_rows(*ws: QuantTensor) -> QuantTensor | None:
    """One matrix holding the rows of several (same format, same width), so one matmul serves them all."""
    if len({w.ggml_type for w in ws}) != 1 or len({w.shape[1] for w in ws}) != 1 or any(len(w.shape) != 2 for w in ws):
        return None
    shape = (sum(w.shape[0] for w in ws), ws[0].shape[1])
    if all(w._raw is None for w in ws):  # packed-only (CUDA): packing is row by row, so rows concatenate
        return QuantTensor(None, ws[0].ggml_type, shape, cat_rows([w.packed for w in ws]))
    return QuantTensor(torch.cat([w.raw for w in ws]), ws[0].ggml_type, shape)


def fuse_bias(*bs: torch.Tensor | None) -> torch.Tensor | None:
    if all(b is None for b in bs):
        return None
    if any(b is None for b in bs):
        raise ValueError("cannot fuse a mix of present and absent biases")
    return torch.cat(bs)


def linear(x: torch.Tensor, w: QuantTensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None, partials: bool = False) -> torch.Tensor | Partials:
    """x @ w.T (+ bias), with w in its block format. On CUDA the activations enter the matmul in bf16 (the
    kernels accumulate in float32) and come out in bf16 (float16 in too), or in `out_dtype` (the logits: float32).
    partials (x 2-D): on CUDA a Q8_0/MXFP4 matmul that splits K may return its Partials instead, for
    add_rms_norm to sum in its own launch."""
    cpu_kernel = w.__dict__.get("_cpu_packed")  # CPU, once packed (quant/cpu_matmul.py): no dispatch on the way
    if cpu_kernel is not None and bias is None and out_dtype is None and x.dim() == 2 and x.shape[0] <= PACKED_MAX_ROWS:
        return cpu_kernel(x)
    if w.device.type != "cuda":
        return w.matmul(x, out_dtype=out_dtype, bias=bias)
    if x.dtype == torch.float32:
        x = x.to(torch.bfloat16)
    elif x.dtype == torch.float16 and out_dtype is None:  # float16 norms (GPT-OSS): bf16 out all the same
        out_dtype = torch.bfloat16
    if partials and x.dim() == 2:
        from worker_orcd.kernels.triton_quant import quant_matmul
        from worker_orcd.quant.gpu_matmul import packed

        p = packed(w)
        if p is not None and p.kind in ("q8_0", "mxfp4"):
            return quant_matmul(p, x, bias=bias, partials=True, out_dtype=out_dtype)
    return w.matmul(x, out_dtype=out_dtype, bias=bias)
