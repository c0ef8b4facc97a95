"""Sweep the batch-invariant decode kernels' tile configs on GPT-OSS-20B shapes (one config must serve every
row count, so each is timed at several row counts) and print the best per shape.

Usage: python bench/gpu_tune.py [dense|moe|fold|kquant|rows ...]   (CUDA; random weights)
  fold: the scale-folded float16 tiles (FOLD) against the default configs, dense and MoE
  rows: row tiles (BM) of 16, 32 and 64 at 1-256 rows, bit for bit against the default
  sweep, sweep_dense, sweep_moe: the folded tiles' configs with float16 x, warps and pipeline stages included
  defaults: the default configs only (dense and MoE), with a hash of each output: run it under two settings of
            an environment switch (e.g. WORKER_ORCD_PREFETCH_XS=0 and 1) to time the switch and check its bits
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_engine_kernels import BW, GPT_OSS_MOE, gpt_oss_experts, time_us  # noqa: E402

from tests.test_triton_kquant import blocks  # noqa: E402
from tests.test_triton_quant import random_blocks  # noqa: E402
from worker_orcd.kernels import triton_kquant, triton_moe  # noqa: E402
from worker_orcd.kernels.triton_quant import gemm_config, gemv_config, pack_q8_0, quant_matmul  # noqa: E402
from worker_orcd.quant.packed import pack_nibbles  # noqa: E402


def dense() -> None:
    dev = "cuda"
    for n, k in [(5120, 2880), (2880, 4096), (201088, 2880)]:
        p = pack_q8_0(random_blocks(T.Q8_0, n, k, dev), n, k)
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for m in (1, 16, 64)}
        iters = 10 if n > 100000 else 30
        gemv = time_us(lambda p=p, x=xs[1]: quant_matmul(p, x, gemv_config(p)), iters=iters)
        results = []
        for f16, w_left, bm, nb, warps in itertools.product((True, False), (False, True), (16, 64), (1, 2, 4), (4, 8)):
            if not f16 and (nb == 1 or bm == 64 or w_left):  # bfloat16 tiles: 16 values of K a step, right operand
                continue
            cfg = {"BM": bm, "BN": 128, "NB": nb, "TARGET": 528, "num_warps": warps, "num_stages": 3, "F16": f16,
                   "W_LEFT": w_left}
            try:
                t = {m: time_us(lambda x=x, cfg=cfg, p=p: quant_matmul(p, x, cfg), iters=iters)
                     for m, x in xs.items()}
            except Exception as e:  # a config the compiler refuses (shared memory)
                print(f"  skip {cfg}: {type(e).__name__}")
                continue
            results.append((t[1] + t[16] / 2 + t[64] / 4, cfg, t))
        results.sort(key=lambda r: r[0])
        bw = p.nbytes / 1e3
        print(f"Q8_0 {n}x{k}: GEMV M=1 {gemv:.1f} us; best gemm configs (score = t1 + t16/2 + t64/4)", flush=True)
        for _, cfg, t in results[:5]:
            print(f"  {cfg}  M=1 {t[1]:.1f} us ({bw / t[1] * 1e9 / BW:.0%} bw)  M=16 {t[16]:.1f}  M=64 {t[64]:.1f}",
                  flush=True)
        for bm in (16, 64):  # the best of each row tile at 64 rows (one BM for every M keeps batch invariance)
            best = min((r for r in results if r[1]["BM"] == bm), key=lambda r: r[2][64], default=None)
            if best is not None:
                t = best[2]
                print(f"  best at M=64 with BM={bm}: {best[1]}  M=1 {t[1]:.1f}  M=16 {t[16]:.1f}  M=64 {t[64]:.1f}")


def moe_inputs(dev: str) -> dict[int, tuple]:
    """Random bf16 tokens, each routed to 4 distinct experts with softmax weights, for 1 to 128 tokens."""
    E, _, D = GPT_OSS_MOE
    inputs = {}
    for t in (1, 4, 16, 64, 128):
        x = torch.randn(t, D, device=dev, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(E)[:4] for _ in range(t)]).to(dev)
        inputs[t] = (x, ids, torch.softmax(torch.randn(t, 4, device=dev), -1))
    return inputs


def moe_times(experts: tuple, inputs: dict, cfg: dict | None = None, iters: int = 20) -> dict[int, float] | None:
    """us a layer of moe_tiles (cfg, default tiles_config()) at each token count of `inputs`; None (and a line
    saying so) for a config the compiler refuses."""
    gate, gb, up, ub, down, db = experts
    try:
        return {t: time_us(lambda a=a: triton_moe.moe_tiles(*a, gate, gb, up, ub, down, db, cfg=cfg), iters=iters)
                for t, a in inputs.items()}
    except Exception as e:  # shared memory, registers
        print(f"  skip {cfg}: {type(e).__name__}")
        return None


def moe_sweep(experts: tuple, inputs: dict, ref: torch.Tensor, cfgs: list[dict], keys: tuple, top: int) -> None:
    """Time moe_tiles at each config, then print the `top` fastest at one token with the `keys` that vary and
    whether the bits at 16 tokens equal `ref` (the default's)."""
    res = []
    for cfg in cfgs:
        tm = moe_times(experts, inputs, cfg, iters=20)
        if tm is not None:
            res.append((tm[1], cfg, tm, torch.equal(triton_moe.moe_tiles(*inputs[16], *experts, cfg=cfg), ref)))
    for _, cfg, tm, same in sorted(res, key=lambda r: r[0])[:top]:
        print("  " + " ".join(f"{k}={cfg[k]}" for k in keys) + "  "
              + "  ".join(f"T={t} {us:.1f}" for t, us in tm.items()) + f"  same bits: {same}", flush=True)


def moe() -> None:
    dev = "cuda"
    gate, gb, up, ub, down, db = gpt_oss_experts(dev)
    inputs = moe_inputs(dev)
    old = {t: time_us(lambda a=a: triton_moe.moe_mxfp4(*a, gate, gb, up, ub, down, db), iters=20)
           for t, a in inputs.items()}
    print("MoE per-pair (before): " + "  ".join(f"T={t} {us:.1f} us" for t, us in old.items()), flush=True)
    results = []
    sweep = [(False, False, 2, *c) for c in itertools.product((64, 128), (1, 256), (1024,), (2, 4))]  # bf16 tiles
    sweep += [(True, False, nb, *c) for nb, *c in itertools.product((1, 2), (64, 128), (1, 256), (1024,), (2, 4))]
    # weights as the dot's left operand (wgmma from registers needs 4 warps and 64+ rows)
    sweep += [(True, True, nb, *c) for nb, *c in itertools.product((1, 2), (64, 128), (256,), (1024,), (4, 8))]
    for f16, w_left, nb, bn, up_target, target, warps in sweep:
        cfg = {"BM": 16, "BN": bn, "NB": nb, "UP_TARGET": up_target, "TARGET": target, "num_warps": warps,
               "num_stages": 3, "F16": f16, "W_LEFT": w_left}
        tm = moe_times((gate, gb, up, ub, down, db), inputs, cfg)
        if tm is not None:
            results.append((tm[1] + tm[16] / 2 + tm[64] / 4, cfg, tm))
    results.sort(key=lambda r: r[0])
    print("MoE tiles: best configs (score = t1 + t16/2 + t64/4)")
    for _, cfg, tm in results[:10]:
        print(f"  {cfg}  " + "  ".join(f"T={t} {us:.1f}" for t, us in tm.items()), flush=True)


def fold() -> None:
    """Scale folding (one dot over NB blocks, PackedWeight.fold): today's default configs, then the split-K
    program targets (how many waves of programs) and NB around them."""
    dev = "cuda"
    for n, k in [(5120, 2880), (2880, 4096), (201088, 2880)]:
        p = pack_q8_0(random_blocks(T.Q8_0, n, k, dev), n, k)
        assert p.fold
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for m in (1, 16, 64)}
        iters = 10 if n > 100000 else 30
        base = gemm_config(p, 1)
        cfgs = [base] + [base | {"NB": nb, "TARGET": tg} for nb, tg in itertools.product((2, 4), (132, 264, 528, 1056))
                         if (nb, tg) != (base["NB"], base["TARGET"])]
        print(f"Q8_0 {n}x{k} ({p.nbytes / 1e6:.1f} MB), default {base}", flush=True)
        for cfg in cfgs:
            try:
                t = {m: time_us(lambda x=x, cfg=cfg, p=p: quant_matmul(p, x, cfg), iters=iters) for m, x in xs.items()}
            except Exception as e:
                print(f"  skip {cfg}: {type(e).__name__}")
                continue
            print(f"  NB={cfg['NB']} TARGET={cfg['TARGET']} warps={cfg['num_warps']} FOLD={cfg.get('FOLD')}  "
                  f"M=1 {t[1]:.1f} us ({p.nbytes / 1e3 / t[1] * 1e9 / BW:.0%} bw)  M=16 {t[16]:.1f}  M=64 {t[64]:.1f}",
                  flush=True)
    gate, gb, up, ub, down, db = gpt_oss_experts(dev)
    inputs = moe_inputs(dev)
    base = triton_moe.tiles_config()
    grid = itertools.product((2, 4), (64, 128, 256, 512), (256, 512, 1024))
    cfgs = [base] + [base | {"NB": nb, "UP_TARGET": up_t, "TARGET": tg} for nb, up_t, tg in grid
                     if (nb, up_t, tg) != (base["NB"], base["UP_TARGET"], base["TARGET"])]
    print(f"MoE tiles, us a layer; default {base}")
    for cfg in cfgs:
        tm = moe_times((gate, gb, up, ub, down, db), inputs, cfg)
        if tm is None:
            continue
        print(f"  NB={cfg['NB']} UP_TARGET={cfg['UP_TARGET']} TARGET={cfg['TARGET']}  "
              + "  ".join(f"T={t} {us:.1f}" for t, us in tm.items()), flush=True)


def kquant() -> None:
    """The nibble formats' decode GEMM (kernels/triton_kquant.py): configs, against dequantize + cuBLAS at M=1."""
    dev = "cuda"
    for kind, (n, k) in itertools.product(("q4_k", "q6_k", "q4_0", "q5_0"), [(2880, 4096), (8192, 2048)]):
        p = pack_nibbles(kind, blocks(kind, n, k, dev), n, k)
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for m in (1, 16, 64)}
        wd = triton_kquant.dequantize_kquant(p)
        dense = time_us(lambda x=xs[1], p=p: x @ triton_kquant.dequantize_kquant(p).T, iters=30)
        cublas = time_us(lambda x=xs[1], wd=wd: x @ wd.T, iters=30)
        results = []
        for bn, warps, stages, target in itertools.product((32, 64, 128), (4, 8), (2, 3), (264, 528)):
            cfg = {"BM": 16, "BN": bn, "TARGET": target, "num_warps": warps, "num_stages": stages}
            try:
                t = {m: time_us(lambda x=x, cfg=cfg, p=p: triton_kquant.kquant_matmul(p, x, cfg), iters=30)
                     for m, x in xs.items()}
            except Exception as e:  # a config the compiler refuses (shared memory, registers)
                print(f"  skip {cfg}: {type(e).__name__}")
                continue
            results.append((t[1] + t[16] / 2 + t[64] / 4, cfg, t))
        results.sort(key=lambda r: r[0])
        bw = p.nbytes / 1e3
        print(f"{kind} {n}x{k}: prefill path (dequantize + cuBLAS) M=1 {dense:.1f} us, cuBLAS on bf16 {cublas:.1f} us; "
              f"default {triton_kquant.kquant_gemm_config(p)}; best (score = t1 + t16/2 + t64/4)", flush=True)
        for _, cfg, t in results[:5]:
            print(f"  {cfg}  M=1 {t[1]:.1f} us ({bw / t[1] * 1e9 / BW:.0%} bw)  M=16 {t[16]:.1f}  M=64 {t[64]:.1f}",
                  flush=True)


def rows() -> None:
    """The dense decode GEMMs at 1 to 256 rows with the grid's row tiles first or not (M_FIRST: the row tiles
    that read one weight tile run side by side), each checked bit for bit against the default's rows. (Session 8
    also swept row tiles of 32 and 64, dense and MoE, a register cap of 128 and M_FIRST for the MoE tiles: all
    slower or the same; NOTES.)"""
    dev = "cuda"
    ms = (1, 16, 64, 128, 256)
    for n, k in [(5120, 2880), (2880, 4096), (201088, 2880)]:
        p = pack_q8_0(random_blocks(T.Q8_0, n, k, dev), n, k)
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.float16) for m in ms}
        iters = 5 if n > 100000 else 20
        base = gemm_config(p, 1)
        ref = quant_matmul(p, xs[256], base)
        print(f"Q8_0 {n}x{k}, default {base}", flush=True)
        for bm, warps, m_first in [(16, 4, True), (16, 4, False), (16, 8, True)]:
            cfg = base | {"BM": bm, "num_warps": warps, "M_FIRST": m_first}
            try:
                t = {m: time_us(lambda x=x, cfg=cfg, p=p: quant_matmul(p, x, cfg), iters=iters) for m, x in xs.items()}
            except Exception as e:
                print(f"  skip BM={bm} warps={warps}: {type(e).__name__}")
                continue
            same = torch.equal(quant_matmul(p, xs[256], cfg), ref)
            one = torch.equal(quant_matmul(p, xs[256][:1], cfg), ref[:1])
            print(f"  BM={bm} warps={warps} M_FIRST={m_first}  " + "  ".join(f"M={m} {us:.1f}" for m, us in t.items())
                  + f"  bits as default: {same}, row alone: {one}", flush=True)


def defaults() -> None:
    """The default configs at 1-128 rows, with a hash of each output (seeded inputs: equal hashes across two
    processes mean equal bits)."""
    import hashlib

    def digest(y: torch.Tensor) -> str:
        return hashlib.sha1(y.float().cpu().numpy().tobytes()).hexdigest()[:8]

    dev = "cuda"
    torch.manual_seed(0)
    for n, k in [(5120, 2880), (2880, 4096), (201088, 2880)]:
        p = pack_q8_0(random_blocks(T.Q8_0, n, k, dev), n, k)
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.float16) for m in (1, 16, 64, 128)}
        iters = 10 if n > 100000 else 30
        t = {m: time_us(lambda x=x, p=p: quant_matmul(p, x), iters=iters) for m, x in xs.items()}
        print(f"Q8_0 {n}x{k}  " + "  ".join(f"M={m} {us:.1f}" for m, us in t.items())
              + f"  hash {digest(quant_matmul(p, xs[128]))}", flush=True)
    torch.manual_seed(1)
    gate, gb, up, ub, down, db = gpt_oss_experts(dev)
    inputs = {t: (x.half(), ids, w) for t, (x, ids, w) in moe_inputs(dev).items()}
    tm = moe_times((gate, gb, up, ub, down, db), inputs)
    y = triton_moe.moe_tiles(*inputs[128], gate, gb, up, ub, down, db)
    print("MoE tiles, us a layer  " + "  ".join(f"T={t} {us:.1f}" for t, us in tm.items()) + f"  hash {digest(y)}",
          flush=True)


def sweep() -> None:
    sweep_dense()
    sweep_moe()


def sweep_dense() -> None:
    """The folded tiles' configs with float16 x (what GPT-OSS feeds them on CUDA: its norms come out in float16),
    warps, pipeline stages and splits included: dense at 1/16/64 rows, MoE at T=1/16/64."""
    dev = "cuda"
    shapes = [(5120, 2880), (2880, 4096)]
    for n, k in shapes:
        p = pack_q8_0(random_blocks(T.Q8_0, n, k, dev), n, k)
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.float16) for m in (1, 16, 64)}
        base = gemm_config(p, 1)
        res = []
        for bn, warps, stages, nb, tg in itertools.product((128, 256), (4, 8), (2, 3, 4), (2, 4), (264, 528)):
            cfg = base | {"BN": bn, "num_warps": warps, "num_stages": stages, "NB": nb, "TARGET": tg}
            try:
                t = {m: time_us(lambda x=x, cfg=cfg, p=p: quant_matmul(p, x, cfg), iters=20) for m, x in xs.items()}
            except Exception as e:
                print(f"  skip {cfg}: {type(e).__name__}")
                continue
            res.append((t[1] + t[16] + t[64] / 4, cfg, t))
        res.sort(key=lambda r: r[0])
        tb = {m: time_us(lambda x=x, p=p, c=base: quant_matmul(p, x, c), iters=20) for m, x in xs.items()}
        print(f"Q8_0 {n}x{k}: default {base}  " + "  ".join(f"M={m} {us:.1f}" for m, us in tb.items()), flush=True)
        for _, cfg, t in res[:6]:
            print(f"  BN={cfg['BN']} warps={cfg['num_warps']} stages={cfg['num_stages']} NB={cfg['NB']} "
                  f"TARGET={cfg['TARGET']}  " + "  ".join(f"M={m} {us:.1f}" for m, us in t.items()), flush=True)


def sweep_moe() -> None:
    dev = "cuda"
    experts = gpt_oss_experts(dev)
    inputs = {t: (x.half(), ids, w) for t, (x, ids, w) in moe_inputs(dev).items() if t in (1, 16, 64)}
    base = triton_moe.tiles_config()
    tb = moe_times(experts, inputs, iters=10)
    print(f"MoE tiles: default {base}  " + "  ".join(f"T={t} {us:.1f}" for t, us in tb.items()), flush=True)
    res = []
    grid = itertools.product((64, 128, 256), (4, 8), (2, 3, 4), ((64, 256), (32, 128), (1, 64), (64, 64), (1, 256)))
    for bn, warps, stages, (up_t, tg) in grid:
        if bn == 256 and warps == 4:
            continue
        cfg = base | {"BN": bn, "num_warps": warps, "num_stages": stages, "UP_TARGET": up_t, "TARGET": tg}
        tm = moe_times(experts, inputs, cfg, iters=10)
        if tm is not None:
            res.append((tm[1] + tm[16] + tm[64] / 4, cfg, tm))
    res.sort(key=lambda r: r[0])
    for name, key in [("score t1 + t16 + t64/4", lambda r: r[0]), ("T=16", lambda r: r[2][16]),
                      ("T=64", lambda r: r[2][64]), ("T=1", lambda r: r[2][1])]:
        print(f"MoE tiles, best by {name}:", flush=True)
        for _, cfg, tm in sorted(res, key=key)[:5]:
            print(f"  BN={cfg['BN']} warps={cfg['num_warps']} stages={cfg['num_stages']} UP_TARGET={cfg['UP_TARGET']} "
                  f"TARGET={cfg['TARGET']}  " + "  ".join(f"T={t} {us:.1f}" for t, us in tm.items()), flush=True)


def small() -> None:
    """Tiles for few rows with the splits of K held at the default's (SPLIT_BN): time at 1, 4 and 16 rows (MoE:
    tokens) and whether the bits equal the default's (they must: only BN, warps and stages change). Then the
    router's columns a program."""
    dev = "cuda"
    torch.manual_seed(0)
    for n, k in [(5120, 2880), (2880, 4096)]:
        p = pack_q8_0(random_blocks(T.Q8_0, n, k, dev), n, k)
        xs = {m: torch.randn(m, k, device=dev, dtype=torch.float16) for m in (1, 4, 16)}
        base = gemm_config(p, 1)
        ref = quant_matmul(p, xs[16], base)
        res = []
        for bn, warps, stages in itertools.product((32, 64, 128), (1, 2, 4, 8), (2, 3, 4, 5)):
            cfg = base | {"BN": bn, "num_warps": warps, "num_stages": stages, "SPLIT_BN": base["BN"]}
            try:
                t = {m: time_us(lambda x=x, cfg=cfg, p=p: quant_matmul(p, x, cfg), iters=20) for m, x in xs.items()}
            except Exception as e:
                print(f"  skip {bn} {warps} {stages}: {type(e).__name__}")
                continue
            res.append((t[1], cfg, t, torch.equal(quant_matmul(p, xs[16], cfg), ref)))
        tb = {m: time_us(lambda x=x, p=p, c=base: quant_matmul(p, x, c), iters=20) for m, x in xs.items()}
        print(f"Q8_0 {n}x{k}: default BN={base['BN']} warps={base['num_warps']} stages={base['num_stages']}  "
              + "  ".join(f"M={m} {us:.1f}" for m, us in tb.items()), flush=True)
        for _, cfg, t, same in sorted(res, key=lambda r: r[0])[:8]:
            print(f"  BN={cfg['BN']} warps={cfg['num_warps']} stages={cfg['num_stages']}  "
                  + "  ".join(f"M={m} {us:.1f}" for m, us in t.items()) + f"  same bits: {same}", flush=True)
    experts = gpt_oss_experts(dev)
    inputs = {t: (x.half(), ids, w) for t, (x, ids, w) in moe_inputs(dev).items() if t in (1, 4, 16)}
    base = triton_moe.tiles_config()
    ref = triton_moe.moe_tiles(*inputs[16], *experts, cfg=base)
    tb = moe_times(experts, inputs, iters=20)
    print(f"MoE tiles: default BN={base['BN']} warps={base['num_warps']} stages={base['num_stages']}  "
          + "  ".join(f"T={t} {us:.1f}" for t, us in tb.items()), flush=True)
    cfgs = [base | {"BN": bn, "num_warps": warps, "num_stages": stages, "SPLIT_BN": base["BN"]}
            for bn, warps, stages in itertools.product((16, 32, 64, 128), (1, 2, 4, 8), (2, 3, 4, 5))
            if not (bn == 16 and warps == 8)]
    moe_sweep(experts, inputs, ref, cfgs, ("BN", "num_warps", "num_stages"), top=10)
    from worker_orcd.kernels import triton_router

    E, _, D = GPT_OSS_MOE
    w, b = torch.randn(E, D, device=dev), torch.randn(E, device=dev)
    for chunk in (384, 192, 128, 64):
        triton_router.ROUTER_CHUNK = chunk
        hs = {m: torch.randn(m, D, device=dev, dtype=torch.float16) for m in (1, 16, 64)}
        t = {m: time_us(lambda h=h: triton_router.route(h, w, b, 4), iters=50) for m, h in hs.items()}
        print(f"router, {chunk} columns a program  " + "  ".join(f"T={m} {us:.1f}" for m, us in t.items()), flush=True)


def small_moe() -> None:
    """The MoE tiles' splits of K (UP_TARGET, TARGET: programs a tile of pairs) with 16- and 32-row tiles: T=1/16/64."""
    experts = gpt_oss_experts("cuda")
    inputs = {t: (x.half(), ids, w) for t, (x, ids, w) in moe_inputs("cuda").items() if t in (1, 16, 64)}
    base = triton_moe.tiles_config()
    res = []
    for bn, warps, up_t, tg in itertools.product((16, 32), (2, 4), (1, 64, 128), (32, 64, 128)):
        cfg = base | {"BN": bn, "SPLIT_BN": bn, "num_warps": warps, "UP_TARGET": up_t, "TARGET": tg}
        tm = moe_times(experts, inputs, cfg, iters=20)
        if tm is not None:
            res.append((tm[1] + tm[16] + tm[64] / 4, cfg, tm))
    for name, key in [("score t1 + t16 + t64/4", lambda r: r[0]), ("T=1", lambda r: r[2][1])]:
        print(f"MoE tiles, best by {name}:", flush=True)
        for _, cfg, tm in sorted(res, key=key)[:8]:
            print(f"  BN={cfg['BN']} warps={cfg['num_warps']} UP_TARGET={cfg['UP_TARGET']} TARGET={cfg['TARGET']}  "
                  + "  ".join(f"T={t} {us:.1f}" for t, us in tm.items()), flush=True)


def nb_moe() -> None:
    """The MoE tiles with more work a loop step (NB blocks, BN rows) and deeper pipelines, the splits of K held
    (SPLIT_BN): T=1/16/64 and whether the bits equal the default's."""
    experts = gpt_oss_experts("cuda")
    inputs = {t: (x.half(), ids, w) for t, (x, ids, w) in moe_inputs("cuda").items() if t in (1, 16, 64)}
    base = triton_moe.tiles_config()
    ref = triton_moe.moe_tiles(*inputs[16], *experts, cfg=base)
    tb = moe_times(experts, inputs, base, iters=20)
    print("MoE tiles, default: " + "  ".join(f"T={t} {us:.1f}" for t, us in tb.items()), flush=True)
    cfgs = [base | {"NB": nb, "BN": bn, "num_warps": warps, "num_stages": stages}
            for nb, bn, warps, stages in itertools.product((2, 4), (32, 64), (4, 8), (3, 4, 5))]
    moe_sweep(experts, inputs, ref, cfgs, ("NB", "BN", "num_warps", "num_stages"), top=12)


def wleft_moe() -> None:
    """The MoE tiles with the weights as the dot's left operand and 8 pairs a tile (tl.dot's N = 8, mma.sync for
    1-2 warps: the decoded weights are the A fragments; sm_90 SASS: ~3.5-4 instructions a weight against 5.4).
    T=1/4/16/64/128, and whether a token alone gives the bits it gets among 16 (batch invariance)."""
    experts = gpt_oss_experts("cuda")
    inputs = {t: (x.half(), ids, w) for t, (x, ids, w) in moe_inputs("cuda").items()}
    base = triton_moe.tiles_config()
    tb = moe_times(experts, inputs, base, iters=20)
    print("MoE tiles, default: " + "  ".join(f"T={t} {us:.1f}" for t, us in tb.items()), flush=True)
    x, ids, w = inputs[16]
    for bm, bn, warps, stages in [(8, 32, 2, 3), (8, 32, 2, 4), (8, 64, 2, 3), (8, 16, 1, 3), (8, 32, 1, 3),
                                  (8, 64, 4, 3), (16, 32, 2, 3)]:
        cfg = base | {"BM": bm, "BN": bn, "num_warps": warps, "num_stages": stages, "W_LEFT": True}
        tm = moe_times(experts, inputs, cfg, iters=20)
        if tm is None:
            continue
        many = triton_moe.moe_tiles(x, ids, w, *experts, cfg=cfg)
        alone = triton_moe.moe_tiles(x[5:6], ids[5:6], w[5:6], *experts, cfg=cfg)
        print(f"  BM={bm} BN={bn} warps={warps} stages={stages} W_LEFT  "
              + "  ".join(f"T={t} {us:.1f}" for t, us in tm.items())
              + f"  alone == among 16: {torch.equal(alone[0], many[5])}", flush=True)


def head() -> None:
    """The 20B's output head (201088 x 2880 Q8_0: 615 MB, 8% of a one-stream step) at 1/16/64 rows: tile width,
    warps, stages and blocks a step, and whether the bits equal the default's (one split of K: they should)."""
    n, k = 201088, 2880
    p = pack_q8_0(random_blocks(T.Q8_0, n, k, "cuda"), n, k)
    xs = {m: torch.randn(m, k, device="cuda", dtype=torch.float16) for m in (1, 16, 64)}
    base = gemm_config(p, 1)
    ref = quant_matmul(p, xs[16], base)
    tb = {m: time_us(lambda x=x: quant_matmul(p, x, base), iters=10) for m, x in xs.items()}
    print(f"head: default BN={base['BN']} NB={base['NB']} warps={base['num_warps']} stages={base['num_stages']}  "
          + "  ".join(f"M={m} {us:.1f}" for m, us in tb.items())
          + f"  ({n * k * 1.0625 / tb[1] / 1e6:.2f} TB/s at M=1)", flush=True)
    res = []
    for bn, nb, warps, stages in itertools.product((64, 128, 256), (2, 4), (4, 8), (3, 4, 5)):
        cfg = base | {"BN": bn, "NB": nb, "num_warps": warps, "num_stages": stages}
        try:
            t = {m: time_us(lambda x=x, cfg=cfg: quant_matmul(p, x, cfg), iters=10) for m, x in xs.items()}
        except Exception as e:
            print(f"  skip {bn} {nb} {warps} {stages}: {type(e).__name__}")
            continue
        res.append((t[1], cfg, t, torch.equal(quant_matmul(p, xs[16], cfg), ref)))
    for _, cfg, t, same in sorted(res, key=lambda r: r[0])[:8]:
        print(f"  BN={cfg['BN']} NB={cfg['NB']} warps={cfg['num_warps']} stages={cfg['num_stages']}  "
              + "  ".join(f"M={m} {us:.1f}" for m, us in t.items()) + f"  same bits: {same}", flush=True)


if __name__ == "__main__":
    for what in sys.argv[1:] or ["moe", "dense"]:
        {"dense": dense, "moe": moe, "fold": fold, "kquant": kquant, "rows": rows, "defaults": defaults,
         "sweep": sweep, "sweep_dense": sweep_dense, "sweep_moe": sweep_moe, "small": small,
         "small_moe": small_moe, "nb_moe": nb_moe, "head": head, "wleft_moe": wleft_moe}[what]()
