"""GPT-OSS MoE decode on mma.sync: the CUDA kernels moe_gate_up and moe_down of mma_decode.cu (kernels/nvrtc.py
compiles and launches them), beside the Triton expert tiles (triton_moe.moe_tiles) they replace on CUDA.

Why not Triton: at one token the Triton tiles ran at ~1.3 TB/s, latency-bound (0.85 waves, 28% occupancy) and
issuing ~5.4 instructions a weight, with no config near the ~23 us a layer one stream's 600 tok/s needs (NOTES,
sessions 10-11). Here a warp decodes its words straight into mma A fragments (~2.5 instructions a weight), keeps
two stages of loads in flight, and each CTA adds its warps' runs of K in shared memory, so gate/up needs no
split-K launch. Batch-invariant like the tiles: a pair's columns never meet the other pairs' (mma_decode.cu).

Where NVRTC is missing (kernels/nvrtc.py), the GPU is older than sm_80, the weights are not row-grouped MXFP4
with foldable scales, or WORKER_ORCD_CUDA_MOE=0, the Triton tiles run instead (`usable` says which, once, in
the log).
"""

from __future__ import annotations

import os

import torch

from worker_orcd.kernels import nvrtc
from worker_orcd.quant.packed import PackedWeight

PAIRS = 16  # pairs a tile of route_tiles: the kernels' two mma columns of 8
ROWS_GROUP = 64  # the packed codes' row groups the kernels index (quant/packed.py)
# H200 sweep (bench/gpu_mma_moe.py), by the columns of 8 pairs a CTA holds: m16 row tiles a CTA (RT), warps a tile
# over runs of K (KS), blocks a register stage (PD; two stages alternate), CTAs an SM the registers are capped for
# (MINB). A kind's KS must be the same for 1 and 2 columns (where a warp's run of K ends sets the bits; RT, PD and
# MINB do not). T=1, L2 flushed, us a layer: 30.9 (Triton tiles 50.1); T=64: 223 (269).
CONFIG = {
    ("gate_up", 1): (1, 2, 3, 1),
    ("gate_up", 2): (1, 2, 2, 1),
    ("down", 1): (1, 2, 3, 1),
    ("down", 2): (1, 2, 2, 1),
}


# Each kind in three variants: (columns of 8 pairs, DIRECT). DIRECT: a CTA per pair, no routing launch (up to
# DIRECT_MAX tokens); else route_tiles' tiles of 16 pairs, one column when no tile can hold more than 8 pairs.
VARIANTS = ((1, True), (1, False), (2, False))
DIRECT_MAX = 1  # tokens (H200, bench/gpu_mma_moe.py cold: T=1 30.9 us direct vs 35.1 in tiles; T=2 51.6 vs 48.3)


def _name(kind: str, cfg: tuple[int, ...], nt: int, direct: bool) -> str:
    return f"moe_{kind}<{', '.join(map(str, cfg))}, {nt}, {str(direct).lower()}>"


def kernels(device: torch.device, configs: dict[tuple, tuple[int, ...]] | None = None) -> dict[tuple, nvrtc.Kernel]:
    """{(kind, nt, direct)}: every variant of both kernels for `configs` ({(kind, nt): (RT, KS, PD, MINB)}, default
    CONFIG), compiled and loaded once per device."""
    configs = configs or CONFIG
    for kind in ("gate_up", "down"):
        if configs[(kind, 1)][1] != configs[(kind, 2)][1]:
            raise ValueError(f"moe_mma: {kind}'s KS differs between 1 and 2 columns (a pair's bits would too)")
    names = {(kind, nt, direct): _name(kind, configs[(kind, nt)], nt, direct)
             for kind in ("gate_up", "down") for nt, direct in VARIANTS}  # fmt: skip
    loaded = nvrtc.load(device, list(names.values()))
    return {v: loaded[n] for v, n in names.items()}


def usable(x: torch.Tensor, *weights: PackedWeight) -> bool:
    """Whether the mma kernels take this MoE: CUDA sm_80+, NVRTC present (first call compiles), MXFP4 codes in
    row groups of 64 with foldable scales (real checkpoints), shapes in whole groups; WORKER_ORCD_CUDA_MOE=0 off."""
    if not x.is_cuda or os.environ.get("WORKER_ORCD_CUDA_MOE", "1") == "0":
        return False
    if any(w.kind != "mxfp4" or w.group != ROWS_GROUP or not w.fold or w.k % 32 for w in weights):
        return False
    names = [_name(kind, CONFIG[(kind, nt)], nt, direct) for kind in ("gate_up", "down") for nt, direct in VARIANTS]
    return nvrtc.probe(x.device, names, "MoE mma kernels", "the Triton expert tiles")


def moe_mma(
    x: torch.Tensor,
    top_ids: torch.Tensor,
    top_w: torch.Tensor,
    tiles: tuple[torch.Tensor, torch.Tensor] | None,
    gate: PackedWeight,
    gate_b: torch.Tensor,
    up: PackedWeight,
    up_b: torch.Tensor,
    down: PackedWeight,
    down_b: torch.Tensor,
    limit: float,
    alpha: float,
    configs: dict | None = None,
) -> torch.Tensor:
    """x [T, D] float16, top_ids / top_w [T, k], and either route_tiles' (pairs, tile_expert) in tiles of PAIRS or
    None (a CTA a pair: T <= DIRECT_MAX) -> part [T * k, 1, D] float32: each pair's routing weight times its
    expert's output (moe_reference's terms, not yet summed over the k)."""
    E, F = gate_b.shape
    T, D = x.shape
    k = top_ids.shape[1]
    if F % ROWS_GROUP or D % ROWS_GROUP:
        raise ValueError(f"moe_mma: rows must be whole groups of {ROWS_GROUP}, got F={F}, D={D}")
    ids = top_ids.reshape(-1).contiguous()
    if tiles is None:
        pairs, route, cols, variant = ids, ids.long(), ids.numel(), (1, True)
    else:
        pairs, route = tiles
        cols, variant = route.numel(), (1 if T <= 8 else 2, False)  # a tile holds at most T pairs
    kern = kernels(x.device, configs)
    cfg = configs or CONFIG
    h = torch.empty(T * k, F, dtype=torch.float16, device=x.device)
    rt, split = cfg[("gate_up", variant[0])][:2]
    kern[("gate_up", *variant)](
        (F // (16 * rt), cols, 1), 32 * rt * split, x.half().contiguous(), pairs, route, gate.codes, gate.scales,
        gate_b.float().contiguous(), up.codes, up.scales, up_b.float().contiguous(), h, E, F, D, k, float(limit),
        float(alpha),
    )  # fmt: skip
    part = torch.empty(T * k, 1, D, dtype=torch.float32, device=x.device)
    rt, split = cfg[("down", variant[0])][:2]
    kern[("down", *variant)](
        (D // (16 * rt), cols, 1), 32 * rt * split, h, pairs, route, top_w.reshape(-1).float().contiguous(),
        down.codes, down.scales, down_b.float().contiguous(), part, E, F, D,
    )  # fmt: skip
    return part
