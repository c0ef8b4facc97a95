"""GPT-OSS-20B on one GPU, every number issue 8 asks for, in one run, each beside the ceiling it implies.

Usage: python bench/gpu.py [--model PATH] [--dense q8_0|bf16] [--streams 4,16,64] [--quick] [--http 1,16,64]

Builds the synthetic 20B GGUF (bench/make_synthetic.py) when --model is absent and the file is missing,
then measures: the device's copy bandwidth; load time and VRAM; 1-stream decode (512-token prompt,
128 new tokens, greedy on the GPU); prefill tokens/s at 512 and 2048; aggregate decode at 4, 16, 64
streams (every stream one row of the same step, each in its own KV slot, 512-token prompts); peak
VRAM for one 8k-token sequence. Ceilings: decode = copy bandwidth / weight bytes read per step (the
DESIGN.md speed model; at batch B the routed experts are counted once per distinct expert, at most all
of them); prefill = the GPU's dense bf16 tensor-core rate / (2 x active parameters per token).
Decode runs through CUDA graphs (engine/cuda_graphs.py) unless --no-graphs. `--device cpu` with a tiny
--model is a smoke run of this script itself (graphs then run eagerly, VRAM figures read 0).
--http N,...: then `worker-orcd serve` on the same file (the engine freed first) and N concurrent streaming
greedy /v1/completions of --http-tokens each (bench/serve_throughput.py): aggregate tok/s, TTFT p50/p99, and
the share of the engine's decode figure for as many streams (needs the server's packages: fastapi, uvicorn,
pydantic, httpx).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import bytes_per_token, copy_bandwidth  # noqa: E402

from worker_orcd.engine.cuda_graphs import GraphedDecoder  # noqa: E402
from worker_orcd.engine.kv_cache import SeqSpan  # noqa: E402
from worker_orcd.gguf import open_gguf  # noqa: E402
from worker_orcd.models.registry import build_model  # noqa: E402

DENSE_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # SXM dense bf16 tensor-core peak, no sparsity


def synthetic_path(dense: str) -> Path:
    path = Path("/tmp") / f"gpt-oss-20b-synthetic-{dense}.gguf"
    if not path.exists():
        here = Path(__file__).resolve().parent
        subprocess.run([sys.executable, str(here / "make_synthetic.py"), str(path), "--dense", dense], check=True)
    return path


def active_params(f) -> int:
    """Parameters one token multiplies by: all but the unrouted experts and the embedding table."""
    arch = f.architecture
    n_exp = f.get(f"{arch}.expert_count") or 0
    used = f.get(f"{arch}.expert_used_count") or 0
    total = 0
    for name, t in f.tensors.items():
        if name == "token_embd.weight":
            continue
        total += t.n_elements * used // n_exp if "_exps." in name and n_exp else t.n_elements
    return total


def expert_bytes(f) -> int:
    return sum(t.nbytes for name, t in f.tensors.items() if "_exps." in name)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def vram_gib(peak: bool = False) -> float:
    if not torch.cuda.is_available():
        return 0.0
    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30


def prefill(net, kv, n: int, slot: int = 0, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, min(30000, net.cfg.vocab_size), (n,), generator=torch.Generator().manual_seed(seed))
    return net.forward(ids, torch.arange(n), kv, seqs=[SeqSpan(slot, 0, n)], logit_rows=torch.tensor([n - 1]))


def decode_rate(net, kv, batch: int, prompt: int, new: int, graphs: bool) -> float:
    """Tokens/s of `batch` sequences decoding together after `prompt`-token prefills, greedy on the GPU."""
    for s in range(batch):
        prefill(net, kv, prompt, slot=s, seed=s)
    slots = list(range(batch))
    tokens = torch.zeros(batch, dtype=torch.long, device=net.device)
    if graphs:
        dec = GraphedDecoder(net, kv, batch_size=batch, capture=net.device.type == "cuda")
        step = lambda tok, pos: dec.step(tok, [pos] * batch, slots)  # noqa: E731
    else:
        seqs = [SeqSpan(s, s, s + 1) for s in slots]
        step = lambda tok, pos: net.forward(tok, torch.full((batch,), pos), kv, seqs=seqs)  # noqa: E731
    for i in range(3):  # warm-up: packing, Triton compiles, graph capture
        tokens = step(tokens, prompt + i).argmax(-1)

    def run() -> None:
        nonlocal tokens
        for i in range(new):
            tokens = step(tokens, prompt + i).argmax(-1)  # stays on the GPU: no host sync inside the loop
    return batch * new / timed(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--dense", choices=["q8_0", "bf16"], default="q8_0")
    ap.add_argument("--streams", default="4,16,64")
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--quick", action="store_true", help="fewer tokens (a smoke run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--long", type=int, default=8192, help="the one long sequence whose peak VRAM is measured")
    ap.add_argument("--http", default="", help="streams over HTTP after the engine rows, e.g. 1,16,64")
    ap.add_argument("--http-tokens", type=int, default=64, help="new tokens a stream over HTTP (issue 14's table)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    path = a.model or synthetic_path(a.dense)
    new = 16 if a.quick else 128
    rows: list[tuple[str, str, str]] = []

    bw = copy_bandwidth() if dev.type == "cuda" else 10e9  # CPU smoke runs: a nominal figure
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    rows.append(("copy bandwidth (read+write)", f"{bw / 1e12:.2f} TB/s", ""))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with open_gguf(path) as f:
        net = build_model(f, dev)
        per_token, active, experts = bytes_per_token(f), active_params(f), expert_bytes(f)
        n_exp = f.get(f"{f.architecture}.expert_count") or 1
        used = f.get(f"{f.architecture}.expert_used_count") or 1
    sync()
    rows.append(("load", f"{time.perf_counter() - start:.1f} s", f"weights {vram_gib():.2f} GiB"))

    kv = net.new_kv_cache(2048 + 8, max(int(s) for s in a.streams.split(",")))
    ceiling1 = bw / per_token
    tps = decode_rate(net, kv, 1, 512, new, a.graphs)
    rows.append(("decode, 1 stream (512 prompt)", f"{tps:,.0f} tok/s", f"{tps / ceiling1:.0%} of {ceiling1:,.0f}"))
    engine = {1: tps}  # decode tok/s by stream count, for the HTTP rows

    flops = next((v for k, v in DENSE_BF16_FLOPS.items() if k in name), 989e12)
    prefill_ceiling = flops / (2 * active)
    for n in (512, 2048):
        prefill(net, kv, n)  # warm-up at this shape
        rate = n / timed(lambda n=n, kv=kv: prefill(net, kv, n))
        rows.append((f"prefill {n}", f"{rate:,.0f} tok/s", f"{rate / prefill_ceiling:.0%} of {prefill_ceiling:,.0f}"))

    for b in (int(s) for s in a.streams.split(",")):
        distinct = min(n_exp, b * used)  # routed experts read once per step however many rows chose them
        step_bytes = per_token + experts * (distinct - used) // n_exp
        ceiling = b * bw / step_bytes
        rate = decode_rate(net, kv, b, 512, new if b <= 16 else new // 2, a.graphs)
        rows.append((f"decode, {b} streams", f"{rate:,.0f} tok/s", f"{rate / ceiling:.0%} of {ceiling:,.0f}"))
        engine[b] = rate

    del kv
    if a.long > 0:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        kv_long = net.new_kv_cache(a.long + 8, 1)
        for start_pos in range(0, a.long, 2048):  # one long sequence, prefilled in 2k chunks
            n = min(2048, a.long - start_pos)
            ids = torch.randint(0, min(30000, net.cfg.vocab_size), (n,))
            net.forward(ids, torch.arange(start_pos, start_pos + n), kv_long, logit_rows=torch.tensor([n - 1]))
        sync()
        rows.append((f"peak VRAM, one {a.long}-token sequence", f"{vram_gib(peak=True):.2f} GiB", "target 16 GiB"))

    if a.http:
        del net
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        rows += http_rows(path, a.device, [int(n) for n in a.http.split(",")], a.http_tokens, engine)

    print(f"device: {name}, torch {torch.__version__}; model {path.name}; "
          f"{'CUDA graphs' if a.graphs else 'eager'} decode, "
          f"{'nondeterministic' if os.environ.get('WORKER_ORCD_NONDETERMINISTIC') == '1' else 'batch-invariant'}")
    width = max(len(r[0]) for r in rows)
    for label, value, ceiling in rows:
        print(f"{label:<{width}}  {value:>14}  {ceiling}")
    print(json.dumps({label: value for label, value, _ in rows}))


def http_rows(path: Path, device: str, streams: list[int], tokens: int, engine: dict[int, float]
              ) -> list[tuple[str, str, str]]:
    """`worker-orcd serve` on the file, then each count of concurrent streaming /v1/completions in turn."""
    import asyncio

    from serve_throughput import measure, start_server

    proc, url = start_server(str(path), device, max(8, *streams))
    rows = []
    try:
        for n in streams:
            r = asyncio.run(measure(url, n, tokens, alone_too=False, openai=True))
            rate = r["n_streams_tok_s"]
            share = f"; {rate / engine[n]:.0%} of the engine's" if n in engine else ""
            note = f"TTFT p50/p99 {r['ttft_p50_ms']:.0f}/{r['ttft_p99_ms']:.0f} ms, {tokens} tokens a stream{share}"
            rows.append((f"HTTP /v1/completions, {n} streams", f"{rate:,.0f} tok/s", note))
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


if __name__ == "__main__":
    main()
