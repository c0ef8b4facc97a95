"""The MoE mma kernels (kernels/cuda_moe.py) on one GPT-OSS-20B layer of random experts: error against the
float64 reference, batch invariance (a token alone = among others, a pair direct = in a tile), and us a layer
beside the Triton tiles.

    python bench/gpu_mma_moe.py [check] [cold] [ncu]      (on a CUDA machine)

check: errors and invariance at 1..128 tokens. cold: the whole MoE (routing, gate/up, down, the token sums) after
an L2 flush, us a layer, at 1..64 tokens: the Triton tiles, and each config (RT, KS, PD, MINB) of the mma kernels
in both modes where they apply (DIRECT: a CTA a pair, no routing launch). ncu: three runs for Nsight Compute.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.gpu_engine_kernels import gpt_oss_experts, graph_us  # noqa: E402
from bench.gpu_tune import moe_inputs  # noqa: E402
from worker_orcd.kernels import cuda_moe, triton_moe  # noqa: E402
from worker_orcd.quant.gpu_matmul import packed  # noqa: E402

CFGS = [(1, 2, 2, 1), (1, 2, 3, 1), (1, 2, 1, 1), (1, 3, 2, 1), (1, 4, 2, 1), (1, 4, 1, 1), (2, 2, 2, 1),
        (1, 2, 2, 2), (1, 3, 1, 1)]  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run(x, ids, w, ex, configs=None, direct: bool | None = None) -> torch.Tensor:
    """y [T, D] float32 through the mma kernels (direct: a CTA a pair; None: as moe_grouped chooses)."""
    gate, gb, up, ub, down, db = ex
    direct = x.shape[0] <= cuda_moe.DIRECT_MAX if direct is None else direct
    tiles = None if direct else triton_moe.route_tiles(ids, gb.shape[0], cuda_moe.PAIRS)
    part = cuda_moe.moe_mma(x, ids, w, tiles, packed(gate), gb, packed(up), ub, packed(down), db, 7.0, 1.702,
                            configs)  # fmt: skip
    return part.reshape(x.shape[0], ids.shape[1], -1).sum(1)


def check() -> None:
    ex = gpt_oss_experts("cuda")
    gate, gb, up, ub, down, db = ex
    print(f"usable: {cuda_moe.usable(torch.zeros(1, device='cuda'), packed(gate), packed(up), packed(down))}")
    for t, (x, ids, w) in moe_inputs("cuda").items():
        x = x.half()
        got = run(x, ids, w, ex, direct=False)
        n = min(t, 4)
        want = triton_moe.moe_reference(x[:n], ids[:n], w[:n], *ex)
        tiles = triton_moe.moe_tiles(x, ids, w, *ex)
        alone = run(x[:1], ids[:1], w[:1], ex)
        direct = run(x, ids, w, ex, direct=True)
        print(
            f"T={t}: rel err mma {rel(got[:n], want):.2e}  tiles {rel(tiles[:n].float(), want):.2e}  "
            f"alone == among: {torch.equal(alone[0], got[0])}  direct == tiles: {torch.equal(direct, got)}  "
            f"finite: {bool(torch.isfinite(got).all())}",
            flush=True,
        )


def cold() -> None:
    """The whole MoE after an L2 flush (256 MB written; the flush's own time taken off), us a layer."""
    ex = gpt_oss_experts("cuda")
    junk = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    flush = graph_us(lambda: junk.zero_())
    print(f"flush alone {flush:.1f} us", flush=True)
    inputs = {t: (x.half(), ids, w) for t, (x, ids, w) in moe_inputs("cuda").items() if t <= 64}
    inputs |= {t: (x.half(), ids, w) for t, (x, ids, w) in _more_inputs((2, 8)).items()}
    inputs = dict(sorted(inputs.items()))

    def cold_us(fn) -> float:
        return graph_us(lambda: (junk.zero_(), fn())) - flush

    tiles = {t: cold_us(lambda a=a: triton_moe.moe_tiles(*a, *ex, partials=True)) for t, a in inputs.items()}
    print("Triton tiles:  " + "  ".join(f"T={t} {us:.1f}" for t, us in tiles.items()), flush=True)
    for cfg in CFGS:
        c = {(kind, nt): cfg for kind in ("gate_up", "down") for nt in (1, 2)}
        try:
            cuda_moe.kernels(torch.device("cuda"), c)
        except RuntimeError as e:
            print(f"  skip {cfg}: {str(e)[:200]}")
            continue
        tm = {t: cold_us(lambda a=a, c=c: run(*a, ex, c, direct=False)) for t, a in inputs.items()}
        dm = {t: cold_us(lambda a=a, c=c: run(*a, ex, c, direct=True)) for t, a in inputs.items() if t <= 8}
        print(f"  {cfg} tiles:  " + "  ".join(f"T={t} {us:.1f}" for t, us in tm.items()), flush=True)
        print(f"  {cfg} direct: " + "  ".join(f"T={t} {us:.1f}" for t, us in dm.items()), flush=True)


def _more_inputs(counts: tuple[int, ...]) -> dict[int, tuple]:
    E, D = 32, 2880
    out = {}
    for t in counts:
        ids = torch.stack([torch.randperm(E)[:4] for _ in range(t)]).cuda()
        out[t] = (torch.randn(t, D, device="cuda"), ids, torch.softmax(torch.randn(t, 4, device="cuda"), -1))
    return out


def ncu() -> None:
    """Three runs at T=$MMA_T (default 1) with config $MMA_CFG (e.g. "1,2,2,1") for Nsight Compute."""
    ex = gpt_oss_experts("cuda")
    default = ",".join(map(str, cuda_moe.CONFIG[("gate_up", 1)]))
    cfg = tuple(int(v) for v in os.environ.get("MMA_CFG", default).split(","))
    x, ids, w = moe_inputs("cuda")[int(os.environ.get("MMA_T", "1"))]
    for _ in range(3):
        run(x.half(), ids, w, ex, {(kind, nt): cfg for kind in ("gate_up", "down") for nt in (1, 2)})
    torch.cuda.synchronize()


if __name__ == "__main__":
    for what in sys.argv[1:] or ["check"]:
        {"check": check, "cold": cold, "ncu": ncu}[what]()
