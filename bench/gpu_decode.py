"""Decode speed of one model on a GPU, batch 1, beside the bandwidth roofline.

Usage: python bench/gpu_decode.py MODEL.gguf [--tokens 64] [--prompt-tokens 32] [--no-graphs]
Prints tokens/s, the bytes of weights one decode step must read (attention + the routed experts
+ head, as DESIGN.md's speed model counts them), the device's measured copy bandwidth, and the
fraction of the roofline reached. Greedy on random prompt ids: no tokenizer needed on the device.
Decode replays CUDA graphs (engine/cuda_graphs.py) unless --no-graphs asks for the eager forward.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from worker_orcd.engine.cuda_graphs import GraphedDecoder
from worker_orcd.gguf import open_gguf
from worker_orcd.models.registry import build_model


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * nbytes * 5 / (time.perf_counter() - start)


def bytes_per_token(f) -> int:
    """Weights one decode step reads: every tensor, but only experts_used/experts of each expert stack."""
    arch = f.architecture
    n_exp = f.get(f"{arch}.expert_count") or 0
    used = f.get(f"{arch}.expert_used_count") or 0
    total = 0
    for name, t in f.tensors.items():
        if name == "token_embd.weight" and "output.weight" in f.tensors:
            total += t.nbytes // t.shape[0]  # one row is gathered
        elif "_exps." in name and n_exp:
            total += t.nbytes * used // n_exp
        else:
            total += t.nbytes
    return total


def decode_step(net, kv, graphs: bool):
    """step(token, position) -> logits [vocab], through CUDA graphs or the eager forward."""
    if graphs:
        g = GraphedDecoder(net, kv, batch_size=1)
        return lambda tok, pos: g.step([tok], [pos], [0])[-1]
    return lambda tok, pos: net.forward(torch.tensor([tok]), torch.tensor([pos]), kv)[-1]


def back_to_back_ms(step, tok: int, pos: int, n: int = 20) -> float:
    """Time per step with no host sync between steps (the same position over and over): when the GPU
    is the bottleneck this is its time per step, when the host is, the host's."""
    step(tok, pos)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        step(tok, pos)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def profiled_kernel_ms(step, tok: int, pos: int, n: int = 5) -> float:
    """Sum of CUDA kernel times per step, as the profiler sees them (kernels inside graphs included)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step(tok, pos)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    return sum(e.device_time_total for e in kernels) / 1e3 / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    start = time.perf_counter()
    with open_gguf(a.model) as f:
        net = build_model(f, dev)
        per_token = bytes_per_token(f)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    vocab = net.cfg.vocab_size
    ids = torch.randint(0, min(vocab, 30000), (a.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    kv = net.new_kv_cache(a.prompt_tokens + a.tokens + 4)
    logits = net.forward(ids, torch.arange(a.prompt_tokens), kv)[-1]
    tok = int(logits.argmax())
    step = decode_step(net, kv, a.graphs)
    for i in range(3):  # warm-up: first use packs/compiles kernels (and captures the graph)
        step(tok, a.prompt_tokens + i)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(a.tokens):
        logits = step(tok, a.prompt_tokens + i)
        tok = int(logits.argmax())  # the host needs the token: one sync per step, as in serving
    elapsed = time.perf_counter() - start
    tps = a.tokens / elapsed
    pos = a.prompt_tokens + a.tokens
    bw = copy_bandwidth()
    ceiling = bw / per_token  # as DESIGN.md's speed model: reads stream at about the copy rate (read + write)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"model: {a.model} ({net.cfg.architecture}), load {load_s:.1f} s, "
          f"VRAM allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    mode = "CUDA graphs" if a.graphs else "eager"
    print(f"decode batch 1 ({mode}): {tps:.1f} tokens/s ({elapsed / a.tokens * 1e3:.2f} ms/token)")
    print(f"weights read per token: {per_token / 2**30:.3f} GiB; copy bandwidth {bw / 1e12:.2f} TB/s "
          f"(read+write); roofline {ceiling:.0f} tokens/s; reached {tps / ceiling:.1%}")
    print(f"steps back to back, no host sync: {back_to_back_ms(step, tok, pos):.2f} ms/step")
    print(f"profiler, CUDA kernels: {profiled_kernel_ms(step, tok, pos):.2f} ms/step")


if __name__ == "__main__":
    main()
