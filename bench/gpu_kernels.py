"""Quantized GEMV/GEMM and MXFP4 MoE kernels on the GPU: correctness against torch, GB/s against copy bandwidth.

GPT-OSS-20B shapes: attention q 4096x2880 and LM head 201088x2880 in Q8_0, 32 experts of 2880x2880 MXFP4
(top-4). Each timing is a CUDA graph of launches over several copies of the weights (more bytes than L2
holds, as successive layers are), divided by the launches; medians of triton.testing.do_bench_cudagraph.

    PYTHONPATH=src python bench/gpu_kernels.py [--quick | --profile]   (--profile: one launch each, for ncu)

Measured 2026-11-23, H100 80GB HBM3 (copy 3000 GB/s read + write), Triton 3.6, bf16 activations:
    MoE MXFP4 T=1, 4 experts (52.9 MB)    38.6 us  1369 GB/s  46%  (gate_up 22.5 us 52%, down 14.8 us 40%)
    MoE MXFP4 T=4, 15 experts (198 MB)   117.5 us  1688 GB/s  56%
    MXFP4 GEMV 23040x2880 (35.3 MB)       22.4 us  1572 GB/s  52%  (codes-only load loop: 15.0 us, 74%)
    Q8_0 GEMV head 201088x2880 (615 MB)  256.5 us  2399 GB/s  80%  (cuBLAS bf16 GEMV: 95% on twice the bytes)
    Q8_0 GEMV attn q 4096x2880 (12.5 MB)   9.8 us  1282 GB/s  43%  (cuBLAS bf16: 10.8 us)
    Q8_0 4096x2880 M=4 19.0 us (GEMV per row); tl.dot prefill M=512: Q8_0 91, MXFP4 117 TFLOP/s
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as T

from worker_orcd.kernels import triton_moe, triton_quant
from worker_orcd.quant import QuantTensor, dequantize
from worker_orcd.quant.gpu_matmul import packed

D, F, E, TOP_K = 2880, 2880, 32, 4
ROWS: list[str] = []


def report(name: str, nbytes: float, ms: float, copy_gbs: float, err: float | None, extra: str = "") -> None:
    gbs = nbytes / ms / 1e6
    e = "-" if err is None else f"{err:.1e}"
    row = f"{name:52s} {nbytes / 1e6:9.1f} {ms * 1e3:9.1f} {gbs:8.0f} {100 * gbs / copy_gbs:6.1f}% {e:>8s} {extra}"
    ROWS.append(row)
    print(row, flush=True)


def _with_x(cfg: dict | None, x32: torch.Tensor) -> tuple[dict | None, torch.Tensor]:
    """A config's "x" entry picks the activation dtype (bf16 unless it says f32); the rest goes to the kernel."""
    if cfg is None:
        return None, x32.bfloat16()
    cfg = dict(cfg)
    return cfg, x32 if cfg.pop("x", "bf16") == "f32" else x32.bfloat16()


def _short(cfg: dict | None) -> str:
    names = {"num_warps": "w", "STAGES": "S", "TARGET": "T", "x": "x:"}
    return ",".join(f"{names.get(a, a)}{b}" for a, b in cfg.items()) if cfg else "default"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm()) if torch.isfinite(a).all() else math.inf


def graph_ms(fns, reps: int = 50) -> float:
    """Median ms of one call, from a CUDA graph that runs every fn once (each over its own weights)."""

    def run():
        for f in fns:
            f()

    return triton.testing.do_bench_cudagraph(run, rep=reps, return_mode="median") / len(fns)


def copy_bandwidth() -> float:
    n = 1 << 30  # 1 GiB each way
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), rep=200, return_mode="median")
    return 2 * n / ms / 1e6


def random_blocks(kind: T, rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    nb = k // 32
    if kind == T.Q8_0:
        d = (torch.rand(rows, nb, 1, device="cuda", generator=gen) * 0.01 + 0.001).half()
        q = torch.randint(0, 256, (rows, nb, 32), dtype=torch.uint8, device="cuda", generator=gen)
        return torch.cat([d.view(torch.uint8).reshape(rows, nb, 2), q], -1).reshape(rows, -1)
    e = torch.randint(118, 127, (rows, nb, 1), dtype=torch.uint8, device="cuda", generator=gen)
    q = torch.randint(0, 256, (rows, nb, 16), dtype=torch.uint8, device="cuda", generator=gen)
    return torch.cat([e, q], -1).reshape(rows, -1)


def quant(kind: T, shape: tuple[int, ...], gen: torch.Generator) -> QuantTensor:
    rows = math.prod(shape[:-1])
    return QuantTensor(random_blocks(kind, rows, shape[-1], gen), kind, shape)


def bench_matmul(
    name: str,
    kind: T,
    n: int,
    k: int,
    m: int,
    copies: int,
    cfgs: list[dict | None],
    copy_gbs: float,
    gen: torch.Generator,
) -> None:
    ws = [quant(kind, (n, k), gen) for _ in range(copies)]
    x32 = torch.randn(m, k, device="cuda", generator=gen)
    w64 = dequantize(ws[0].raw, kind, (n, k)).double()
    refs = {torch.float32: x32.double() @ w64.T, torch.bfloat16: x32.bfloat16().double() @ w64.T}  # same x as fed
    del w64
    pw = [packed(w) for w in ws]
    nbytes = pw[0].nbytes
    for cfg in cfgs:
        label = f"{name} M={m} " + _short(cfg)
        cfg, x = _with_x(cfg, x32)
        try:
            y = torch.full((m, n), float("nan"), device="cuda", dtype=x.dtype)
            triton_quant.quant_matmul(pw[0], x, cfg, out=y)
            err = rel_err(y, refs[x.dtype])
            ms = graph_ms([lambda p=p, c=cfg, xx=x: triton_quant.quant_matmul(p, xx, c) for p in pw])
            tf = 2 * m * n * k / ms / 1e9
            report(label, nbytes, ms, copy_gbs, err, f"{tf:.1f} TFLOP/s" if m > 1 else "")
        except Exception as exc:  # one failing variant must not hide the others
            print(f"{label}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    if m == 1 and kind == T.Q8_0:  # cuBLAS on bf16 weights, for scale (twice the bytes)
        xb = x32.bfloat16()
        wb = [dequantize(w.raw, kind, (n, k)).bfloat16() for w in ws[: max(1, copies // 2)]]
        ms = graph_ms([lambda w=w: xb @ w.T for w in wb])
        report(f"{name} M={m} torch bf16 (cuBLAS)", n * k * 2, ms, copy_gbs, rel_err(xb @ wb[0].T, refs[xb.dtype]))
        del wb
    del ws, pw


def bench_moe(t: int, layers: int, cfgs: list[dict | None], copy_gbs: float, gen: torch.Generator) -> None:
    def layer():
        return (
            quant(T.MXFP4, (E, F, D), gen),
            torch.randn(E, F, device="cuda", generator=gen),
            quant(T.MXFP4, (E, F, D), gen),
            torch.randn(E, F, device="cuda", generator=gen),
            quant(T.MXFP4, (E, D, F), gen),
            torch.randn(E, D, device="cuda", generator=gen),
        )

    ls = [layer() for _ in range(layers)]
    x32 = torch.randn(t, D, device="cuda", generator=gen)
    ids = [torch.stack([torch.randperm(E, device="cuda", generator=gen)[:TOP_K] for _ in range(t)]) for _ in ls]
    wts = [torch.softmax(torch.randn(t, TOP_K, device="cuda", generator=gen), -1) for _ in ls]
    flat = [(i.reshape(-1), w.reshape(-1)) for i, w in zip(ids, wts)]
    refs = {dt: triton_moe.moe_reference(x32.to(dt), ids[0], wts[0], *ls[0]) for dt in (torch.float32, torch.bfloat16)}
    used = len(torch.unique(ids[0]))
    nbytes = used * 3 * F * D // 32 * 17
    for cfg in cfgs:
        label = f"MoE MXFP4 T={t} ({used} experts) " + _short(cfg)
        cfg, x = _with_x(cfg, x32)
        try:
            y = triton_moe.moe_mxfp4(x, ids[0], wts[0], *ls[0], cfg=cfg)
            err = rel_err(y, refs[x.dtype])
            ms = graph_ms(
                [
                    lambda i=i, L=L, c=cfg, xx=x: triton_moe.moe_mxfp4(xx, ids[i], wts[i], *L, cfg=c)
                    for i, L in enumerate(ls)
                ]
            )
            hs = [triton_moe.moe_gate_up(x, f[0], TOP_K, *L[:4], cfg=cfg) for f, L in zip(flat, ls)]
            gu = graph_ms(
                [
                    lambda f=f, L=L, c=cfg, xx=x: triton_moe.moe_gate_up(xx, f[0], TOP_K, *L[:4], cfg=c)
                    for f, L in zip(flat, ls)
                ]
            )
            dn = graph_ms(
                [
                    lambda f=f, L=L, h=h, c=cfg: triton_moe.moe_down(h, f[0], f[1], *L[4:], cfg=c)
                    for f, L, h in zip(flat, ls, hs)
                ]
            )
            split = f"gate_up {gu * 1e3:.1f} us {nbytes * 2 / 3 / gu / 1e6:.0f} GB/s, down {dn * 1e3:.1f} us"
            report(label, nbytes, ms, copy_gbs, err, split + f" {nbytes / 3 / dn / 1e6:.0f} GB/s")
        except Exception as exc:
            print(f"{label}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    del ls


@triton.jit
def _load_only(w_ptr, out_ptr, nblk, BN: tl.constexpr, NB: tl.constexpr, STAGES: tl.constexpr):
    """Streams MXFP4 code words in the GEMV's tile pattern with no decoding: the memory path alone."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    b = tl.arange(0, NB)
    off = ((n[:, None] * nblk + b[None, :]) * 4)[:, :, None] + tl.arange(0, 4)[None, None, :]
    acc = tl.zeros([BN, NB, 4], dtype=tl.int32)
    for kb in tl.range(0, nblk, NB, num_stages=STAGES):
        acc ^= tl.load(w_ptr + off + kb * 4, mask=(kb + b < nblk)[None, :, None], other=0)
    tl.store(out_ptr + n, tl.sum(tl.sum(acc, axis=2), axis=1))


def bench_load_only(copy_gbs: float, gen: torch.Generator) -> None:
    n, k, copies = 8 * F, D, 8
    ws = [torch.randint(0, 2**30, (n, k // 8), dtype=torch.int32, device="cuda", generator=gen) for _ in range(copies)]
    out = torch.empty(n, dtype=torch.int32, device="cuda")
    for BN, NB, S, nw in [(16, 8, 1, 4), (32, 8, 1, 4), (16, 8, 3, 4), (64, 8, 1, 8)]:

        def launch(w, BN=BN, NB=NB, S=S, nw=nw):
            _load_only[(n // BN,)](w, out, k // 32, BN, NB, S, num_warps=nw)

        ms = graph_ms([lambda w=w: launch(w) for w in ws])
        report(f"load only MXFP4 codes {n}x{k} BN{BN},NB{NB},S{S},w{nw}", n * k // 2, ms, copy_gbs, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="default configs only")
    ap.add_argument("--profile", action="store_true", help="one launch of each default kernel, for ncu")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda")
    gen.manual_seed(int(time.time()))  # fresh inputs every run
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
    copy_gbs = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)\n")
    head = f"{'kernel':52s} {'MB':>9s} {'us':>9s} {'GB/s':>8s} {'copy%':>7s} {'rel err':>8s}"
    print(head)

    def cfgs(base: dict, *changes: dict) -> list[dict | None]:
        return [None] if args.quick else [None] + [{**base, **c} for c in changes]

    g = {"BN": 8, "NB": 16, "STAGES": 0, "TARGET": 1024, "num_warps": 4}
    f32 = {"x": "f32"}
    moe_cfgs = cfgs(g, f32, {"BN": 16, "NB": 4})
    mx_cfgs = cfgs({**g, "BN": 16, "NB": 8}, f32, {"BN": 8, "NB": 16})
    q8_cfgs = [None]
    head_cfgs = [None]
    if args.profile:
        moe = [quant(T.MXFP4, (E, F, D), gen), torch.randn(E, F, device="cuda"), quant(T.MXFP4, (E, F, D), gen)]
        moe += [torch.randn(E, F, device="cuda"), quant(T.MXFP4, (E, D, F), gen), torch.randn(E, D, device="cuda")]
        x = torch.randn(1, D, device="cuda")
        ids, wt = torch.tensor([[3, 7, 11, 30]], device="cuda"), torch.full((1, 4), 0.25, device="cuda")
        dense, head = packed(quant(T.MXFP4, (8 * F, D), gen)), packed(quant(T.Q8_0, (201088, D), gen))
        for _ in range(2):
            triton_moe.moe_mxfp4(x, ids, wt, *moe)
            triton_quant.quant_matmul(dense, x)
            triton_quant.quant_matmul(head, x)
        torch.cuda.synchronize()
        return
    bench_load_only(copy_gbs, gen)
    bench_moe(1, 4, moe_cfgs, copy_gbs, gen)
    bench_moe(4, 4, [None], copy_gbs, gen)
    bench_moe(8, 4, [None], copy_gbs, gen)
    bench_matmul("Q8_0 attn q 4096x2880", T.Q8_0, 4096, D, 1, 24, q8_cfgs, copy_gbs, gen)
    bench_matmul("Q8_0 head 201088x2880", T.Q8_0, 201088, D, 1, 1, head_cfgs, copy_gbs, gen)
    bench_matmul("MXFP4 dense 23040x2880", T.MXFP4, 8 * F, D, 1, 8, mx_cfgs, copy_gbs, gen)
    small = [None, {"BM": 16, "BN": 64, "NB": 4, "num_warps": 4, "num_stages": 3}]  # GEMV per row vs tl.dot
    big = [None]
    bench_matmul("Q8_0 attn q 4096x2880", T.Q8_0, 4096, D, 4, 24, small, copy_gbs, gen)
    bench_matmul("MXFP4 dense 23040x2880", T.MXFP4, 8 * F, D, 4, 8, small, copy_gbs, gen)
    bench_matmul("Q8_0 attn q 4096x2880", T.Q8_0, 4096, D, 8, 24, small, copy_gbs, gen)
    bench_matmul("MXFP4 dense 23040x2880", T.MXFP4, 8 * F, D, 8, 8, small, copy_gbs, gen)
    bench_matmul("Q8_0 attn q 4096x2880", T.Q8_0, 4096, D, 512, 4, big, copy_gbs, gen)
    bench_matmul("MXFP4 23040x2880", T.MXFP4, 8 * F, D, 512, 2, big, copy_gbs, gen)
    print(f"\ncopy {copy_gbs:.0f} GB/s\n{head}\n" + "\n".join(ROWS))


if __name__ == "__main__":
    main()
