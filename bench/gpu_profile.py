"""Profile a few batch-1 decode steps of a model on CUDA: the top CUDA kernels and CPU ops by time.

Usage: python bench/gpu_profile.py MODEL.gguf [--steps 5]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from worker_orcd.gguf import open_gguf
from worker_orcd.models.registry import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    with open_gguf(a.model) as f:
        net = build_model(f, torch.device("cuda"))
    kv = net.new_kv_cache(64)
    net.forward(torch.arange(4), torch.arange(4), kv)
    for i in range(4, 8):
        net.forward(torch.tensor([i]), torch.tensor([i]), kv)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(8, 8 + a.steps):
            net.forward(torch.tensor([i]), torch.tensor([i]), kv)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
