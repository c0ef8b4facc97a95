"""Time the CPU matmul candidates for a dense (Q8_0-like) weight on this CPU, at decode row counts.

Usage: python bench/cpu_matmul_paths.py [--threads N]
Run it as an AVX2 machine would: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/...
Prints per shape and row count the best-of-N milliseconds and the relative error against float64 on the
exact weight (int8/int4 candidates requantize a Q8_0 weight, so their error includes that loss).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf import quants

from worker_orcd.quant.cpu_matmul import RowsLinear

SHAPES = {"head 49152x576": (49152, 576), "gate|up 3072x576": (3072, 576), "down 576x1536": (576, 1536),
          "qkv 960x576": (960, 576)}


def q8_0_weight(n: int, k: int) -> torch.Tensor:
    raw = quants.quantize(np.random.default_rng(0).standard_normal((n, k)).astype(np.float32) * 0.05, T.Q8_0)
    return torch.from_numpy(quants.dequantize(raw, T.Q8_0).reshape(n, k))


def candidates(w: torch.Tensor) -> dict:
    """name -> callable(x float32 [M, K]) -> float32 [M, N]; a candidate this CPU cannot run is left out."""
    out = {"f32 F.linear": lambda x: F.linear(x, w)}
    wb = w.bfloat16()
    out["bf16 F.linear"] = lambda x: F.linear(x.bfloat16(), wb).float()
    out["f16 GEMV per row"] = RowsLinear(w, torch.float16)  # the portable path: ATen's GEMV per row, oneDNN off
    out["bf16 GEMV per row"] = RowsLinear(w, torch.bfloat16)  # its fallback where float16 fails the probe
    try:
        p = torch.ops.mkldnn._reorder_linear_weight(wb, 2)
        out["bf16 oneDNN prepacked"] = lambda x: torch.ops.mkldnn._linear_pointwise(
            x.bfloat16(), p, None, "none", [], "").float()
    except RuntimeError as e:
        print(f"  (bf16 oneDNN prepacked: {str(e).splitlines()[0]})")
    s8 = w.abs().amax(1) / 127  # per-row int8: what _weight_int8pack_mm and fbgemm take
    q8 = torch.round(w / s8[:, None]).to(torch.int8)
    sb = s8.bfloat16()
    out["int8pack bf16"] = lambda x: torch._weight_int8pack_mm(x.bfloat16(), q8, sb).float()
    out["int8pack f32"] = lambda x: torch._weight_int8pack_mm(x, q8, s8)
    n, k = w.shape
    g = w.reshape(n, k // 32, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    sz = torch.stack([scale.T, zero.T], -1).bfloat16().contiguous()
    out["int4pack (lossy)"] = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.bfloat16(), packed, 32, sz).float()
    sz32 = sz.float()
    out["int4pack f32 activations"] = lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz32)
    q8t = q8.T.contiguous()

    def int_mm(x: torch.Tensor) -> torch.Tensor:  # int8 activations per row, as llama.cpp's Q8 dot products
        sx = x.abs().amax(-1, keepdim=True) / 127
        return torch._int_mm(torch.round(x / sx).to(torch.int8), q8t).float() * sx * s8

    out["_int_mm int8 x int8"] = int_mm
    if hasattr(torch.ops.aten, "_dyn_quant_matmul_4bit"):  # KleidiAI on ARM64; a reference loop elsewhere
        s4 = g.abs().amax(-1) / 7
        c4 = (torch.round(g / s4[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(n, k)
        dq = torch.ops.aten._dyn_quant_pack_4bit_weight(c4[:, ::2] | (c4[:, 1::2] << 4), s4, None, 32, k, n)
        out["dyn_quant 4bit (lossy)"] = lambda x: torch.ops.aten._dyn_quant_matmul_4bit(x, dq, 32, k, n)
    try:
        qw = torch.quantize_per_channel(w, s8.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        pk = torch.ops.quantized.linear_prepack(qw, None)
        out["fbgemm dynamic int8"] = lambda x: torch.ops.quantized.linear_dynamic(x, pk)
    except RuntimeError as e:
        print(f"  (fbgemm: {str(e).splitlines()[0]})")
    return out


def best_ms(f, x, reps: int) -> float:
    f(x)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(x)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"oneDNN bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, threads {a.threads}")
    for name, (n, k) in SHAPES.items():
        w = q8_0_weight(n, k)
        print(name)
        for cname, f in candidates(w).items():
            row = []
            for m in (1, 8):
                x = torch.randn(m, k)
                ref = (x.double() @ w.double().T)
                err = float((f(x).double() - ref).norm() / ref.norm())
                row.append(f"M={m}: {best_ms(f, x, a.reps):7.3f} ms (err {err:.1e})")
            print(f"  {cname:24s} " + "  ".join(row))


if __name__ == "__main__":
    main()
