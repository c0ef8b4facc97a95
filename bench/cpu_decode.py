"""CPU decode speed of the default model: worker-orcd beside HF transformers on the same GGUF.

Usage: python bench/cpu_decode.py [--model PATH] [--tokens 64] [--no-transformers]
Prints tokens/s for both (greedy, after a short prompt, prefill excluded), the CPU, the thread
count, and the ratio. transformers dequantizes the GGUF to float32 (needs `accelerate`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ours(path: str | None, prompt: str, n: int) -> tuple[float, list[int]]:
    import worker_orcd

    m = worker_orcd.load(path, device="cpu")
    ids = m.tokenize(prompt, add_special=True)
    kv = m.net.new_kv_cache(len(ids) + n + 1)
    logits = m.net.forward(torch.tensor(ids), torch.arange(len(ids)), kv)[-1]
    out, start = [], time.perf_counter()
    for i in range(n):
        tok = int(logits.argmax())
        out.append(tok)
        logits = m.net.forward(torch.tensor([tok]), torch.tensor([len(ids) + i]), kv)[-1]
    return n / (time.perf_counter() - start), out


def transformers_speed(path: str, ids: list[int], n: int) -> tuple[float, list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    with torch.inference_mode():
        r = hf(torch.tensor([ids]), use_cache=True)
        past, logits = r.past_key_values, r.logits[0, -1]
        out, start = [], time.perf_counter()
        for _ in range(n):
            tok = int(logits.argmax())
            out.append(tok)
            r = hf(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past, logits = r.past_key_values, r.logits[0, -1]
    return n / (time.perf_counter() - start), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", default="The history of the printing press begins")
    ap.add_argument("--no-transformers", action="store_true")
    a = ap.parse_args()
    import worker_orcd
    from worker_orcd.packaged import default_model_path

    path = a.model or str(default_model_path())
    ids = worker_orcd.load_tokenizer(path).tokenize(a.prompt, add_special=True)
    ours_tps, ours_ids = ours(path, a.prompt, a.tokens)
    print(f"CPU: {cpu_name()}, torch threads: {torch.get_num_threads()}, model: {os.path.basename(path)}")
    print(f"worker-orcd  decode: {ours_tps:7.1f} tokens/s ({a.tokens} tokens, greedy)")
    if not a.no_transformers:
        hf_tps, hf_ids = transformers_speed(path, ids, a.tokens)
        same = sum(x == y for x, y in zip(ours_ids, hf_ids)) / a.tokens
        print(f"transformers decode: {hf_tps:7.1f} tokens/s (float32 weights)")
        print(f"ratio: {ours_tps / hf_tps:.2f}x transformers; same greedy tokens: {same:.0%}")
    recorded = Path(__file__).resolve().parents[1] / "tests" / "data" / "references" / "speed_cpu.json"
    if recorded.exists():
        ref = json.loads(recorded.read_text())["models"]["smollm2"]
        print(f"recorded on this machine kind (best of 5, tests/data/references/speed_cpu.json): llama.cpp "
              f"{ref['llama_cpp_1thread']['decode_tok_per_s']:.0f} tok/s at 1 thread, "
              f"{ref['llama_cpp']['decode_tok_per_s']:.0f} at 2 threads under load")


if __name__ == "__main__":
    main()
