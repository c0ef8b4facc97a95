"""Which CPU matmul kernels this CPU can run: decided once per process, forced with WORKER_ORCD_CPU_KERNELS.

Paths, fastest first (each kernel is also tried once on a small matrix before it is trusted):
- On `onednn` and `portable`, Q4_0 and Q4_1 weights take llama.cpp's integer dot products (cpu_q8dot.py,
  compiled at first use) where a C compiler is found; WORKER_ORCD_CPU_Q8DOT=0 leaves them to the kernels below.
- `onednn`: int4pack for Q4_0/Q4_1/Q4_K, dense bf16 through oneDNN's prepacked kernels. Needs oneDNN's
  bf16 ISA (x86 AVX-512 BW/VL/DQ, AVX512-BF16, AMX or AVX-NE-CONVERT): on an AVX2-only CPU oneDNN
  refuses the bf16 reorder.
- `portable`: int4pack, dense float16 through torch's own GEMV, one row per call (AVX2, AVX-512, ARM64);
  bf16 there if this CPU's float16 GEMV fails its probe (which also asks for float16's accuracy).
- `reference`: float32 weights, one row per call; exact, slowest, runs on any CPU.
`auto` takes `onednn` on x86 AVX-512, else `portable`; a kernel that fails its probe drops to the next path
with a one-line warning naming what is missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENV = "WORKER_ORCD_CPU_KERNELS"
PATHS = ("auto", "onednn", "portable", "reference")
log = logging.getLogger("worker_orcd.cpu")


@dataclass(frozen=True)
class CpuKernels:
    path: str  # onednn | portable | reference
    int4: bool  # torch's int4pack kernel for the 4-bit formats (else they go dense)
    dense: str  # onednn-bf16 | f16 | bf16 | f32: how a dense weight multiplies
    capability: str  # torch.backends.cpu.get_cpu_capability()
    q8dot: bool = False  # llama.cpp's integer dot products for Q4_0/Q4_1 (cpu_q8dot.py)

    def describe(self) -> str:
        four = "int4pack" if self.int4 else f"dense {self.dense}"
        if self.q8dot:
            return (f"CPU kernels: {self.path} (Q4_0/Q4_1: q8dot; Q4_K: {four}; Q5/Q6/Q8: {self.dense}; "
                    f"ATen {self.capability})")
        return f"CPU kernels: {self.path} (Q4_x: {four}; Q5/Q6/Q8: {self.dense}; ATen {self.capability})"


_chosen: CpuKernels | None = None


def requested() -> str:
    """The path asked for through WORKER_ORCD_CPU_KERNELS (default auto; an unknown name warns and means auto)."""
    name = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if name not in PATHS:
        log.warning("CPU kernels: %s=%r is not one of %s; using auto", ENV, name, ", ".join(PATHS))
        return "auto"
    return name


def force(name: str) -> CpuKernels:
    """Choose `name` (one of PATHS) for this process, as the env var would, and decide again now."""
    global _chosen
    if name.strip().lower() not in PATHS:
        raise ValueError(f"--cpu-kernels {name!r}: expected one of {', '.join(PATHS)}")
    os.environ[ENV] = name.strip().lower()
    _chosen = None
    return cpu_kernels()


def cpu_kernels() -> CpuKernels:
    """The kernels for this process, decided on the first call (probes run once) and logged once."""
    global _chosen
    if _chosen is None:
        _chosen = _decide(requested())
        log.info(_chosen.describe())
    return _chosen


def _decide(want: str) -> CpuKernels:
    cap = torch.backends.cpu.get_cpu_capability()
    if want == "reference":
        return CpuKernels("reference", False, "f32", cap)
    int4 = _int4_ok()
    q8dot = _q8dot_ok()
    if want in ("auto", "onednn") and _onednn_ok(cap, forced=want == "onednn"):
        return CpuKernels("onednn", int4, "onednn-bf16", cap, q8dot)
    if _probe("torch float16 GEMV", _try_f16_gemv, "dense weights use bf16 (2^-9 instead of 2^-12 relative)"):
        return CpuKernels("portable", int4, "f16", cap, q8dot)
    if not _probe("torch bf16 GEMV", _try_bf16_gemv, "dense weights use float32 (the reference path)"):
        return CpuKernels("reference", int4, "f32", cap)
    return CpuKernels("portable", int4, "bf16", cap, q8dot)


def _onednn_bf16_supported() -> bool:
    """oneDNN's own answer (it honours ONEDNN_MAX_CPU_ISA); False where this torch has no oneDNN linear."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _onednn_ok(cap: str, forced: bool) -> bool:
    """oneDNN's bf16 linear: on x86 AVX-512 (its batch invariance is known there) or when forced."""
    portable = "dense weights use the portable path (torch float16 GEMV, one row per call)"
    if not _onednn_bf16_supported():
        log.warning("CPU kernels: CPU (or torch build) lacks oneDNN's bf16 ISA (avx512bw+avx512vl+avx512dq "
                    "or avx_ne_convert; ATen capability %s); %s", cap, portable)
        return False
    if not cap.startswith("AVX512") and not forced:
        log.info("CPU kernels: ATen capability %s is not AVX-512; %s", cap, portable)
        return False
    return _probe("oneDNN bf16 linear", _try_onednn, portable)


def _q8dot_ok() -> bool:
    from worker_orcd.quant import cpu_q8dot

    if not cpu_q8dot.enabled():
        log.info("CPU kernels: q8dot off (%s=0); Q4_0/Q4_1 use int4pack", cpu_q8dot.ENV)
        return False
    instead = "Q4_0/Q4_1 use int4pack"
    if not _probe("q8dot (llama.cpp's integer dot products, compiled here)", _try_q8dot, instead):
        return False
    if not cpu_q8dot.threads_ok():
        log.warning("CPU kernels: q8dot was built without OpenMP (one thread) and torch runs %d; %s",
                    torch.get_num_threads(), instead)
        return False
    return True


def _int4_ok() -> bool:
    dense = "Q4_x weights go dense"
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        log.warning("CPU kernels: this torch has no int4pack CPU kernel (needs torch >= 2.5); %s", dense)
        return False
    return _probe("int4pack", _try_int4, dense)


def _probe(name: str, check: Callable[[], bool], instead: str) -> bool:
    """Run a kernel once on a small matrix: it must not raise, must match float32 and be batch invariant."""
    try:
        ok = check()
    except (RuntimeError, NotImplementedError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.warning("CPU kernels: %s is not available here (%s); %s", name, reason, instead)
        return False
    if not ok:
        log.warning("CPU kernels: %s gave wrong or batch-dependent results in its probe; %s", name, instead)
    return ok


def _probe_inputs(n: int = 32, k: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(13)
    return torch.randn(n, k, generator=g) / k**0.5, torch.randn(8, k, generator=g)


def _agrees(f: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, x: torch.Tensor, tol: float = 2e-2) -> bool:
    """f(x) close to x @ w.T in float32, and each row alone gives the same bits as in the batch of 8."""
    y = f(x).float()
    ref = x @ w.T
    close = float((y - ref).norm() / ref.norm()) < tol
    return close and all(torch.equal(f(x[i : i + 1]).float(), y[i : i + 1]) for i in range(len(x)))


def _try_onednn() -> bool:
    from worker_orcd.quant.cpu_matmul import Bf16Linear

    w, x = _probe_inputs()
    return _agrees(Bf16Linear(w), w, x)


def _try_bf16_gemv() -> bool:
    from worker_orcd.quant.cpu_matmul import RowsLinear

    w, x = _probe_inputs()
    return _agrees(RowsLinear(w, torch.bfloat16), w, x)


def _try_f16_gemv() -> bool:
    """float16 must beat bf16's rounding (measured 3.6e-4 vs 2.9e-3): a kernel that accumulates in float16, or
    rounds through bf16, is not worth its range handling."""
    from worker_orcd.quant.cpu_matmul import RowsLinear

    w, x = _probe_inputs()
    return _agrees(RowsLinear(w, torch.float16), w, x, tol=1e-3)


def _try_int4() -> bool:
    from worker_orcd.quant.cpu_matmul import Int4Linear

    w, x = _probe_inputs()
    codes = torch.randint(0, 16, w.shape, generator=torch.Generator().manual_seed(1))
    scale = torch.full((w.shape[0], w.shape[1] // 32), 0.01)
    zero = torch.zeros_like(scale)
    wq = (codes - 8).float() * 0.01
    return _agrees(Int4Linear(codes, scale, zero), wq, x)


def _try_q8dot() -> bool:
    """Each format on the blocks of a random weight, against float32 on the same weight."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    from worker_orcd.quant.cpu_q8dot import Q8DotLinear
    from worker_orcd.quant.formats import dequantize

    w, x = _probe_inputs()
    for kind in (T.Q4_0, T.Q4_1):
        raw = torch.from_numpy(quants.quantize(w.numpy(), kind).copy())
        if not _agrees(Q8DotLinear(raw, kind, tuple(w.shape)), dequantize(raw, kind, tuple(w.shape)).float(), x):
            return False
    return True
