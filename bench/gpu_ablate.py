"""What each group of a decode step's kernels costs inside the graphed step: the step's wall time with the group
left out (its launches skipped, a fixed result in its place), against the whole step.

Usage: python bench/gpu_ablate.py [--model PATH] [--batches 1,64] [--split-cap 16] [--up-target 1] [--moe-cfg JSON]

The synthetic 20B, 512-token prompts, the static decode step captured in a CUDA graph as the engine runs it.
A kernel's time in a profile is not what it costs the step: under PDL the next launch overlaps it, and a
latency-bound kernel leaves the GPU idle. Leaving a group out measures its marginal cost. The results of an
ablated step are garbage (routing included); only its time means something. At more than one row, leaving out
the attention or the norms makes every row the same, so the MoE then reads only 4 experts: those two rows mislead
there (the router's fixed routing spreads the rows over every expert). --split-cap: the dense decode
GEMMs' most splits of K (triton_quant.split_k); --up-target: the MoE gate/up's split-K target (tiles_config's
UP_TARGET); --moe-cfg: other tiles_config changes; each value timed as the whole step.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import prefill, synthetic_path, timed  # noqa: E402

from worker_orcd.engine.cuda_graphs import GraphedDecoder  # noqa: E402
from worker_orcd.gguf import open_gguf  # noqa: E402
from worker_orcd.kernels import triton_moe, triton_quant, triton_router  # noqa: E402
from worker_orcd.models import gpt_oss  # noqa: E402
from worker_orcd.models.registry import build_model  # noqa: E402

_fixed: dict[tuple, torch.Tensor] = {}


def fixed(key: tuple, make) -> torch.Tensor:
    """One tensor per key, made before the capture (the warm-up steps run eagerly first)."""
    if key not in _fixed:
        _fixed[key] = make()
    return _fixed[key]


@contextmanager
def patched(obj, name: str, fn):
    old = getattr(obj, name)
    setattr(obj, name, fn)
    try:
        yield
    finally:
        setattr(obj, name, old)


def no_attention():
    return patched(gpt_oss, "cached_attention", lambda q, k, v, kv, i, plan, scale, sinks=None: q)


def no_router():
    def route(h, w, b, k):
        T = h.shape[0]
        ids = fixed(("ids", T, k), lambda: (torch.arange(T * k, device=h.device) % w.shape[0]).view(T, k))
        return ids, fixed(("w", T, k), lambda: torch.full((T, k), 1.0 / k, device=h.device))

    return patched(triton_router, "route", route)


def no_moe():
    def moe(x, *args, **kw):
        return fixed(("moe", *x.shape), lambda: torch.zeros(x.shape, dtype=torch.float32, device=x.device))

    return patched(triton_moe, "moe_grouped", moe)


def no_norms():
    def add_rms_norm(x, y, w, eps, dtype):
        return x, fixed(("h", *x.shape), lambda: torch.ones(x.shape, dtype=dtype, device=x.device))

    return patched(gpt_oss, "add_rms_norm", add_rms_norm)


def split_cap(cap: int):
    base = triton_quant.split_k

    def split_k(nblk: int, tiles: int, nb: int, target: int) -> tuple[int, int]:
        if target < 500:  # the MoE's targets (64): as they are
            return base(nblk, tiles, nb, target)
        steps = -(-nblk // nb)
        splits = max(1, min(-(-target * cap // 8 // max(tiles, 1)), steps // 2 or 1, cap))
        chunk = -(-steps // splits) * nb
        return -(-nblk // chunk), chunk

    return patched(triton_quant, "split_k", split_k)


def moe_config(**changes):
    base = triton_moe.tiles_config
    return patched(triton_moe, "tiles_config", lambda: base() | changes)


def step_us(net, kv, batch: int, n: int = 100) -> float:
    slots, pos = list(range(batch)), 512
    dec = GraphedDecoder(net, kv, batch_size=batch)
    tokens = torch.zeros(batch, dtype=torch.long, device="cuda")
    for _ in range(3):  # eager warm-up (compiles, fixed tensors), then the capture
        dec.step(tokens, [pos] * batch, slots)

    def run() -> None:
        for _ in range(n):
            dec.step(tokens, [pos] * batch, slots)

    return 1e6 * timed(run) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--split-cap", default="")
    ap.add_argument("--no-ablate", action="store_true", help="only the variants, no group left out")
    ap.add_argument("--up-target", default="", help="MoE gate/up's split-K target (programs a tile), e.g. 1,128")
    ap.add_argument("--moe-cfg", default="", help='MoE tiles_config changes, JSON objects split by ";"')
    a = ap.parse_args()
    with open_gguf(a.model or synthetic_path("q8_0")) as f:
        net = build_model(f, torch.device("cuda"))
    groups = {} if a.no_ablate else {"attention (+ merge)": no_attention, "router (logits + top-k)": no_router,
                                     "MoE (route, tiles, sums)": no_moe, "add + norm (x2 a layer)": no_norms}
    caps = [int(c) for c in a.split_cap.split(",") if c]
    groups |= {f"dense split cap {c}": (lambda c=c: split_cap(c)) for c in caps}
    for n in (int(c) for c in a.up_target.split(",") if c):
        groups[f"MoE UP_TARGET {n}"] = lambda n=n: moe_config(UP_TARGET=n)
    for changes in (json.loads(c) for c in a.moe_cfg.split(";") if c.strip()):
        groups[f"MoE {changes}"] = lambda changes=changes: moe_config(**changes)
    lines = []
    for batch in map(int, a.batches.split(",")):
        kv = net.new_kv_cache(1024, n_slots=batch)
        for s in range(batch):
            prefill(net, kv, 512, slot=s, seed=s)
        whole = step_us(net, kv, batch)
        lines.append(f"batch {batch}: whole step {whole:,.0f} us ({batch / whole * 1e6:,.0f} tok/s)")
        for name, make in groups.items():
            _fixed.clear()
            with make():
                us = step_us(net, kv, batch)
            torch.cuda.empty_cache()
            what = "without it" if name.endswith(")") else "step"
            rate = batch / us * 1e6
            lines.append(f"  {name[:60]:28s} {what} {us:8,.0f} us  ({whole - us:+,.0f} us, {rate:,.0f} tok/s)")
        print("\n".join(lines[-len(groups) - 1:]), flush=True)
        del kv
        torch.cuda.empty_cache()
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
