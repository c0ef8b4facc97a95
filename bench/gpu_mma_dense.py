"""The dense Q8_0 mma kernel (kernels/cuda_dense.py) on GPT-OSS-20B's decode matrices, random weights: error
against float64, batch invariance (a row alone = among others), and us beside the Triton tiles, L2 flushed.

    python bench/gpu_mma_dense.py [check] [cold]      (on a CUDA machine)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.gpu_engine_kernels import graph_us  # noqa: E402
from tests.test_triton_quant import random_blocks  # noqa: E402
from worker_orcd.kernels import cuda_dense, triton_quant  # noqa: E402
from worker_orcd.quant import dequantize  # noqa: E402
from worker_orcd.quant.packed import pack_q8_0  # noqa: E402

SHAPES = {"qkv": (5120, 2880), "o": (2880, 4096), "head": (201088, 2880)}
CFGS = {"qkv": [(1, 4, 3, 1), (1, 2, 3, 1), (1, 8, 3, 1), (1, 4, 2, 1), (1, 6, 3, 1), (2, 4, 3, 1), (1, 8, 2, 1)],
        "o": [(1, 4, 3, 1), (1, 2, 3, 1), (1, 8, 3, 1), (1, 4, 2, 1), (1, 6, 3, 1), (2, 4, 3, 1), (1, 8, 2, 1)],
        "head": [(4, 1, 3, 1), (2, 1, 3, 1), (1, 1, 3, 1), (4, 1, 2, 1), (2, 2, 3, 1), (4, 1, 4, 1)]}  # fmt: skip


def weights(n: int, k: int):
    raw = random_blocks(T.Q8_0, n, k, "cuda")
    return raw, pack_q8_0(raw, n, k)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check() -> None:
    for name, (n, k) in SHAPES.items():
        raw, p = weights(n, k)
        wd = dequantize(raw, T.Q8_0, (n, k)).double() if n < 10000 else None
        bias = torch.randn(n, device="cuda")
        for m in (1, 5, 16, 64, 128):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16 if name == "o" else torch.float16)
            y = torch.empty(m, n, device="cuda", dtype=torch.float32 if name == "head" else torch.bfloat16)
            ok = cuda_dense.usable(p, x, y)
            got = cuda_dense.q8_matmul(p, x, y.clone(), bias).float()
            alone = cuda_dense.q8_matmul(p, x[-1:], y[-1:].clone(), bias).float()
            tiles = triton_quant.quant_matmul(p, x, cfg=triton_quant.gemm_config(p, m), bias=bias,
                                              out_dtype=y.dtype).float()  # fmt: skip
            line = f"{name} M={m}: usable {ok}  alone == among {torch.equal(alone[0], got[-1])}"
            if wd is not None:
                want = x.half().double() @ wd.T + bias.double()
                line += f"  rel err mma {rel(got, want):.2e}  tiles {rel(tiles, want):.2e}"
            else:
                line += f"  mma vs tiles {rel(got, tiles):.2e}"
            print(line, flush=True)


def cold() -> None:
    junk = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    flush = graph_us(lambda: junk.zero_())
    for name, (n, k) in SHAPES.items():
        raw, p = weights(n, k)
        bias = None if name == "head" else torch.randn(n, device="cuda")
        xs = {m: torch.randn(m, k, device="cuda").to(torch.bfloat16 if name == "o" else torch.float16)
              for m in (1, 16, 64, 128)}  # fmt: skip
        dt = torch.float32 if name == "head" else torch.bfloat16

        def cold_us(fn) -> float:
            return graph_us(lambda: (junk.zero_(), fn())) - flush

        def tiles(x, p=p, bias=bias, dt=dt):
            return triton_quant.quant_matmul(p, x, cfg=triton_quant.gemm_config(p, x.shape[0]), bias=bias, out_dtype=dt)

        tm = {m: cold_us(lambda x=x: tiles(x)) for m, x in xs.items()}
        mb = n * k * 34 / 32 / 1e6
        print(
            f"{name} {n}x{k} ({mb:.1f} MB) Triton tiles: " + "  ".join(f"M={m} {us:.1f}" for m, us in tm.items()),
            flush=True,
        )
        for cfg in CFGS[name]:
            ys = {m: torch.empty(m, n, device="cuda", dtype=dt) for m in xs}
            try:
                t = {m: cold_us(lambda x=x, y=ys[m], c=cfg, p=p, b=bias: cuda_dense.q8_matmul(p, x, y, b, c))
                     for m, x in xs.items()}  # fmt: skip
            except RuntimeError as e:
                print(f"  skip {cfg}: {str(e)[:150]}")
                continue
            print(
                f"  {cfg}: "
                + "  ".join(f"M={m} {us:.1f}" for m, us in t.items())
                + f"  ({mb / t[1] / 1e6:.2f} TB/s at M=1)",
                flush=True,
            )


if __name__ == "__main__":
    for what in sys.argv[1:] or ["check"]:
        {"check": check, "cold": cold}[what]()
