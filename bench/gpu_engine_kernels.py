"""The GPU engine's kernels on GPT-OSS-20B shapes, each timed beside the bandwidth or FLOP rate it implies.

Usage: python bench/gpu_engine_kernels.py   (on a CUDA machine; random weights, no model file needed)

Rows: dense Q8_0 matmuls at decode batch sizes through the CUDA-core GEMV and the tl.dot GEMM (both split
over K by shape only), the grouped MXFP4 MoE at decode and prefill sizes (against the per-pair kernel it
replaces), paged decode attention over 1..64 sequences, and the prefill matmul (dequantize + cuBLAS).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.test_triton_quant import random_blocks  # noqa: E402
from worker_orcd.engine.kv_cache import KVCache, SeqSpan  # noqa: E402
from worker_orcd.kernels import triton_moe  # noqa: E402
from worker_orcd.kernels.attention import plan_attention  # noqa: E402
from worker_orcd.kernels.triton_attention import paged_attention  # noqa: E402
from worker_orcd.kernels.triton_quant import (  # noqa: E402
    gemm_config,
    gemv_config,
    pack_q8_0,
    quant_matmul,
)
from worker_orcd.quant import QuantTensor  # noqa: E402

BW = 4.2e12  # H200 device copy bandwidth measured (DESIGN.md)


GPT_OSS_MOE = (32, 2880, 2880)  # experts, expert width, model width of GPT-OSS-20B


def gpt_oss_experts(dev: str) -> tuple:
    """One GPT-OSS-20B MoE layer of random MXFP4 experts, packed for the GPU kernels, with random biases:
    (gate, gate_b, up, up_b, down, down_b)."""
    E, F, D = GPT_OSS_MOE

    def q(r: int, c: int) -> QuantTensor:
        return QuantTensor(random_blocks(T.MXFP4, E * r, c, dev), T.MXFP4, (E, r, c)).pack_resident()

    gb, ub, db = (torch.randn(E, n, device=dev) for n in (F, F, D))
    return q(F, D), gb, q(F, D), ub, q(D, F), db


def graph_us(fn, iters: int = 20, replays: int = 3) -> float:
    """us a call of fn: `iters` calls captured in a CUDA graph (after a warm-up call and a warm replay), the mean
    over `replays` replays."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * iters)


def time_us(fn, iters: int = 50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # replay: launch overhead out of the kernel's time
        for _ in range(iters):
            fn()
    start.record()
    g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def main() -> None:
    rows = []
    dev = "cuda"
    for n, k in [(4096, 2880), (512, 2880), (2880, 4096), (201088, 2880)]:
        p = pack_q8_0(random_blocks(T.Q8_0, n, k, dev), n, k)
        for m in (1, 16, 64):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            for name, cfg in (("gemv", gemv_config(p)), ("gemm", gemm_config(p, m))):
                us = time_us(lambda p=p, x=x, cfg=cfg: quant_matmul(p, x, cfg))
                gbs = p.nbytes / us / 1e3
                rows.append((f"Q8_0 {n}x{k} M={m} {name}", f"{us:8.1f} us", f"{gbs:7.0f} GB/s ({gbs * 1e9 / BW:.0%})"))
    E, F, D = GPT_OSS_MOE
    gate, gb, up, ub, down, db = gpt_oss_experts(dev)
    for t in (1, 4, 16, 64, 2048):
        x = torch.randn(t, D, device=dev, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(E)[:4] for _ in range(t)]).to(dev)
        w = torch.softmax(torch.randn(t, 4, device=dev), -1)
        us = time_us(lambda x=x, ids=ids, w=w: triton_moe.moe_grouped(x, ids, w, gate, gb, up, ub, down, db),
                     iters=10 if t > 64 else 50)
        experts = min(E, 4 * t)
        gbs = experts * 3 * F * D * 17 / 32 / us / 1e3
        tf = t * 4 * 3 * F * D * 2 / us / 1e6
        rows.append((f"MoE T={t}", f"{us:8.1f} us", f"{gbs:7.0f} GB/s ({gbs * 1e9 / BW:.0%}), {tf:.0f} TFLOP/s"))
    Hkv, hd, H = 8, 64, 64
    for b, ctx in ((1, 640), (16, 640), (64, 640), (1, 8192)):
        kv = KVCache(1, Hkv, hd, ctx + 16, b, torch.bfloat16, dev)
        spans = [SeqSpan(s, s, s + 1) for s in range(b)]
        plan = plan_attention(torch.full((b,), ctx - 1), spans, None, kv)
        t = plan.tiles
        qx = torch.randn(b, H, hd, device=dev, dtype=torch.bfloat16)
        sinks = torch.randn(H, device=dev)
        for window in (None, 128):
            us = time_us(lambda qx=qx, t=t, kv=kv, window=window, sinks=sinks: [paged_attention(
                qx, kv.k[0], kv.v[0], kv.tables, t.row_slot, t.positions, r, n_, bq, 0.125, sinks=sinks,
                window=window, splits=t.splits) for r, n_, bq in t.groups])
            read = b * min(ctx, window or ctx) * Hkv * hd * 2 * 2
            rows.append((f"attention decode B={b} ctx={ctx} window={window}", f"{us:8.1f} us",
                         f"{read / us / 1e3:7.0f} GB/s"))
    for n, k in [(4096, 2880), (2880, 4096)]:
        p = pack_q8_0(random_blocks(T.Q8_0, n, k, dev), n, k)
        x = torch.randn(2048, k, device=dev, dtype=torch.bfloat16)
        us = time_us(lambda p=p, x=x: quant_matmul(p, x), iters=20)
        rows.append((f"prefill Q8_0 {n}x{k} M=2048", f"{us:8.1f} us", f"{2 * 2048 * n * k / us / 1e6:.0f} TFLOP/s"))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    width = max(len(r[0]) for r in rows)
    for label, value, extra in rows:
        print(f"{label:<{width}}  {value}  {extra}")


if __name__ == "__main__":
    main()
