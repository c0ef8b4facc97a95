"""Where a decode step's GPU time goes: per kernel, for batches of 1, 16 and 64 rows of the synthetic 20B.

Usage: python bench/gpu_step_profile.py [--model PATH] [--batches 1,16,64] [--steps 10]

Each batch: 512-token prompts in their own KV slots, then the static decode step (the one CUDA graphs
capture) run eagerly under torch.profiler for --steps steps; printed per step: the top kernels by GPU time,
their launches, the sum of kernel time, and beside it the graphed step's wall time (the same step replayed
from a CUDA graph, timed without the profiler). Kernel sum / graphed wall = how busy the GPU is.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import prefill, synthetic_path, timed  # noqa: E402

from worker_orcd.engine.cuda_graphs import GraphedDecoder  # noqa: E402
from worker_orcd.gguf import open_gguf  # noqa: E402
from worker_orcd.models.registry import build_model  # noqa: E402


def kernel_table(prof, steps: int) -> list[tuple[str, float, int]]:
    """(kernel name, us per step, launches per step), largest first."""
    total, count = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name[:70]] += e.device_time
            count[e.name[:70]] += 1
    return [(k, us / steps, count[k] // steps) for k, us in total.most_common()]


def steps_per_second(dec: GraphedDecoder, tokens: torch.Tensor, pos: int, slots: list[int], n: int) -> float:
    def run() -> None:
        nonlocal tokens
        for _ in range(n):
            tokens = dec.step(tokens, [pos] * len(slots), slots).argmax(-1)

    return n / timed(run)


def profile_batch(net, batch: int, steps: int, top: int) -> str:
    kv = net.new_kv_cache(1024, n_slots=batch)
    for s in range(batch):
        prefill(net, kv, 512, slot=s, seed=s)
    slots, pos = list(range(batch)), 512
    tokens = torch.zeros(batch, dtype=torch.long, device="cuda")
    eager = GraphedDecoder(net, kv, batch_size=batch, capture=False)
    steps_per_second(eager, tokens, pos, slots, 3)  # warm-up: Triton compiles
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        steps_per_second(eager, tokens, pos, slots, steps)
    rows = kernel_table(prof, steps)
    busy = sum(us for _, us, _ in rows)
    graphed = GraphedDecoder(net, kv, batch_size=batch)
    steps_per_second(graphed, tokens, pos, slots, 3)  # capture
    wall_us = 1e6 / steps_per_second(graphed, tokens, pos, slots, 50)
    eager_us = 1e6 / steps_per_second(eager, tokens, pos, slots, 20)
    print(
        f"\nbatch {batch}: kernels {busy:,.0f} us/step in {sum(n for *_, n in rows)} launches; graphed step "
        f"{wall_us:,.0f} us ({batch / wall_us * 1e6:,.0f} tok/s); eager step {eager_us:,.0f} us"
    )
    for name, us, n in rows[:top]:
        print(f"  {us:8.1f} us {100 * us / busy:5.1f}%  x{n:<4d} {name}")
    busy_pct = 100 * busy / wall_us
    return f"batch {batch:3d}: kernel sum {busy:7,.0f} us, graphed step {wall_us:7,.0f} us, busy {busy_pct:3.0f}%"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=14)
    a = ap.parse_args()
    with open_gguf(a.model or synthetic_path("q8_0")) as f:
        net = build_model(f, torch.device("cuda"))
    summary = [profile_batch(net, b, a.steps, a.top) for b in map(int, a.batches.split(","))]
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
