# ruff: noqa: B023  (each closure runs within its own loop iteration)
"""Where the MoE tiles' time goes on GPT-OSS-20B shapes: routing sort, gate/up, down, the row sum (CUDA).

Usage: python bench/gpu_moe_parts.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gpu_engine_kernels import GPT_OSS_MOE, gpt_oss_experts, time_us  # noqa: E402

from worker_orcd.kernels import triton_moe as tm  # noqa: E402
from worker_orcd.kernels.triton_quant import split_k  # noqa: E402


def main() -> None:
    dev = "cuda"
    E, F, D = GPT_OSS_MOE
    gate, gb, up, ub, down, db = gpt_oss_experts(dev)
    gp, upk, dp = tm._packed(gate, "g"), tm._packed(up, "u"), tm._packed(down, "d")
    for cfg in ({"BM": 16, "BN": 128, "NB": 2, "TARGET": 512, "num_warps": 4, "num_stages": 3},
                {"BM": 16, "BN": 128, "NB": 2, "TARGET": 512, "num_warps": 8, "num_stages": 3},
                {"BM": 16, "BN": 64, "NB": 2, "TARGET": 512, "num_warps": 2, "num_stages": 3},
                {"BM": 16, "BN": 32, "NB": 2, "TARGET": 512, "num_warps": 1, "num_stages": 3}):
        c = dict(cfg)
        BM, BN, NB, target = c.pop("BM"), c.pop("BN"), c.pop("NB"), c.pop("TARGET")
        print(cfg)
        for t in (1, 16, 64):
            x = torch.randn(t, D, device=dev, dtype=torch.bfloat16)
            ids = torch.stack([torch.randperm(E)[:4] for _ in range(t)]).to(dev)
            w = torch.softmax(torch.randn(t, 4, device=dev), -1)
            pairs, te = tm.group_pairs(ids, E, BM)
            h = torch.empty(t * 4, F, dtype=torch.bfloat16, device=dev)
            tiles = triton.cdiv(D, BN)
            splits, chunk = split_k(F // 32, tiles, NB, target)
            part = torch.empty(t * 4, splits, D, dtype=torch.float32, device=dev)
            wf = w.reshape(-1).float()

            def up_() -> None:
                tm._tiles_gate_up_kernel[(triton.cdiv(F, BN), te.numel())](
                    x, pairs, te, gp.codes, gp.scales, gb, upk.codes, upk.scales, ub, h, h, E, F, D, 4, t * 4, 45,
                    7.0, 1.702, BM=BM, BN=BN, NB=NB, DOT_F32=False, SPLIT=False, **c)

            def down_() -> None:
                tm._tiles_down_kernel[(tiles, te.numel(), splits)](
                    h, pairs, te, wf, dp.codes, dp.scales, db, part, E, F, D, chunk, BM=BM, BN=BN, NB=NB,
                    DOT_F32=False, **c)

            parts = {"group_pairs": lambda ids=ids: tm.group_pairs(ids, E, BM),
                     "route_tiles": lambda ids=ids: tm.route_tiles(ids, E, BM), "gate_up": up_, "down": down_,
                     "all": lambda x=x, ids=ids, w=w: tm.moe_tiles(x, ids, w, gate, gb, up, ub, down, db, cfg=cfg)}
            print(f"  T={t}: " + "  ".join(f"{k} {time_us(f, iters=20):.1f}" for k, f in parts.items())
                  + f"  (programs: gate_up {triton.cdiv(F, BN) * te.numel()}, down {tiles * te.numel() * splits})",
                  flush=True)


if __name__ == "__main__":
    main()
