"""Sweep the batch-invariant decode kernels' tile configs on GPT-OSS-20B shapes (one config must serve every
row count, so each is timed at 1, 16 and 64 rows) and print the best per shape.

Usage: python bench/gpu_tune.py   (CUDA; random weights)
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_engine_kernels import time_us  # noqa: E402

from tests.test_triton_quant import random_blocks  # noqa: E402
from worker_orcd.kernels import triton_moe  # noqa: E402
from worker_orcd.kernels.triton_quant import pack_q8_0, quant_matmul  # noqa: E402
from worker_orcd.quant import QuantTensor  # noqa: E402


def main() -> None:
    dev = "cuda"
    for n, k in [(5120, 2880), (2880, 4096), (201088, 2880)]:
        p = pack_q8_0(random_blocks(T.Q8_0, n, k, dev), n, k)
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for m in (1, 16, 64)}
        results = []
        for bn, nb, target, stages in itertools.product((32, 64, 128), (2, 4, 8), (264, 528), (2, 3)):
            cfg = {"BM": 16, "BN": bn, "NB": nb, "TARGET": target, "num_warps": 4, "num_stages": stages}
            try:
                t = {m: time_us(lambda x=x, cfg=cfg, p=p: quant_matmul(p, x, cfg), iters=10 if n > 100000 else 30)
                     for m, x in xs.items()}
            except Exception as e:  # a config the compiler refuses (shared memory)
                print(f"  skip {cfg}: {type(e).__name__}")
                continue
            results.append((t[1] + t[16] / 2 + t[64] / 4, cfg, t))
        results.sort(key=lambda r: r[0])
        print(f"Q8_0 {n}x{k}: best gemm configs (score = t1 + t16/2 + t64/4)")
        for _, cfg, t in results[:4]:
            print(f"  {cfg}  M=1 {t[1]:.1f} us  M=16 {t[16]:.1f}  M=64 {t[64]:.1f}")
    E, F, D = 32, 2880, 2880

    def q(r: int, c: int) -> QuantTensor:
        return QuantTensor(random_blocks(T.MXFP4, E * r, c, dev), T.MXFP4, (E, r, c)).pack_resident()

    gate, up, down = q(F, D), q(F, D), q(D, F)
    gb, ub, db = (torch.randn(E, n, device=dev) for n in (F, F, D))
    inputs = {}
    for t in (1, 16, 64):
        x = torch.randn(t, D, device=dev, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(E)[:4] for _ in range(t)]).to(dev)
        inputs[t] = (x, ids, torch.softmax(torch.randn(t, 4, device=dev), -1))
    results = []
    for bn, nb, stages, warps in itertools.product((8, 16, 32), (8, 16), (0, 2), (2, 4)):
        cfg = {"BN": bn, "NB": nb, "STAGES": stages, "TARGET": 1024, "num_warps": warps}
        try:
            tm = {t: time_us(lambda a=a, cfg=cfg: triton_moe.moe_mxfp4(*a, gate, gb, up, ub, down, db, cfg=cfg),
                             iters=20) for t, a in inputs.items()}
        except Exception as e:
            print(f"  skip {cfg}: {type(e).__name__}")
            continue
        results.append((tm[1] + tm[16] / 4 + tm[64] / 16, cfg, tm))
    results.sort(key=lambda r: r[0])
    print("MoE per-pair: best configs (score = t1 + t16/4 + t64/16)")
    for _, cfg, tm in results[:5]:
        print(f"  {cfg}  T=1 {tm[1]:.1f} us  T=16 {tm[16]:.1f}  T=64 {tm[64]:.1f}")


if __name__ == "__main__":
    main()
