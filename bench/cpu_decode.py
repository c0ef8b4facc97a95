"""CPU speed of the default model: worker-orcd beside HF transformers and llama.cpp on the same GGUF, one run.

Usage: python bench/cpu_decode.py [--model PATH] [--tokens 64] [--reps 3] [--threads N]
         [--cpu-kernels auto|onednn|portable|reference] [--llama-python PY] [--no-transformers] [--no-llama]
As an AVX2-only CPU would run it: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ... --cpu-kernels portable.
Prints the CPU kernel path taken, then decode tokens/s (greedy, after a short prompt) and prefill tokens/s
(512 tokens of tests/data/ppl_text.txt) for each engine, best of --reps, and the ratios.
transformers dequantizes the GGUF to float32 (needs `accelerate`). llama.cpp runs through llama-cpp-python in
a subprocess of `--llama-python` (default: $LLAMA_CPP_PYTHON, else this interpreter); build it from its sdist in
its own venv, as scripts/make_references.py says (`pip install --no-binary llama-cpp-python llama-cpp-python`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

LLAMA_SCRIPT = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
a = json.loads(sys.argv[1])
llm = Llama(model_path=a["path"], n_ctx=1024, n_batch=512, logits_all=True, n_threads=a["threads"],
            n_threads_batch=a["threads"], seed=0, verbose=False)
decode, decode_cpu, prefill, out = 0.0, 0.0, 0.0, []
for _ in range(a["reps"]):
    llm.reset()
    llm.eval(a["ids"])
    toks, t, c = [], time.perf_counter(), time.process_time()
    for _ in range(a["n"]):
        toks.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([toks[-1]])
    decode, out = max(decode, a["n"] / (time.perf_counter() - t)), toks
    decode_cpu = max(decode_cpu, a["n"] / (time.process_time() - c))
    llm.reset()
    t = time.perf_counter()
    llm.eval(a["prefill_ids"])
    prefill = max(prefill, len(a["prefill_ids"]) / (time.perf_counter() - t))
import llama_cpp
print(json.dumps({"decode": decode, "decode_cpu": decode_cpu, "prefill": prefill, "ids": out,
                  "version": llama_cpp.__version__}))
"""


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ours(m, ids: list[int], prefill_ids: list[int], n: int, reps: int) -> tuple[tuple[float, float], float, list[int]]:
    """Best decode tokens/s (wall, per CPU second) and prefill tokens/s of `reps` runs, and the greedy ids."""
    decode, decode_cpu, prefill, out = 0.0, 0.0, 0.0, []
    for _ in range(reps):
        kv = m.net.new_kv_cache(len(ids) + n + 1)
        logits = m.net.forward(torch.tensor(ids), torch.arange(len(ids)), kv)[-1]
        toks, start, cpu = [], time.perf_counter(), time.process_time()
        for i in range(n):
            toks.append(int(logits.argmax()))
            logits = m.net.forward(torch.tensor([toks[-1]]), torch.tensor([len(ids) + i]), kv)[-1]
        decode, out = max(decode, n / (time.perf_counter() - start)), toks
        decode_cpu = max(decode_cpu, n / (time.process_time() - cpu))
        kv = m.net.new_kv_cache(len(prefill_ids))
        start = time.perf_counter()
        m.net.forward(torch.tensor(prefill_ids), torch.arange(len(prefill_ids)), kv)
        prefill = max(prefill, len(prefill_ids) / (time.perf_counter() - start))
    return (decode, decode_cpu), prefill, out


def transformers_speed(path: str, ids: list[int], n: int, reps: int) -> tuple[tuple[float, float], list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32)
    best, best_cpu, out = 0.0, 0.0, []
    with torch.inference_mode():
        for _ in range(reps):
            r = hf(torch.tensor([ids]), use_cache=True)
            past, logits = r.past_key_values, r.logits[0, -1]
            toks, start, cpu = [], time.perf_counter(), time.process_time()
            for _ in range(n):
                toks.append(int(logits.argmax()))
                r = hf(torch.tensor([[toks[-1]]]), past_key_values=past, use_cache=True)
                past, logits = r.past_key_values, r.logits[0, -1]
            best, out = max(best, n / (time.perf_counter() - start)), toks
            best_cpu = max(best_cpu, n / (time.process_time() - cpu))
    return (best, best_cpu), out


def llama_cpp_speed(python: str, path: str, ids: list[int], prefill_ids: list[int], n: int, reps: int,
                    threads: int) -> dict | None:
    args = {"path": path, "ids": ids, "prefill_ids": prefill_ids, "n": n, "reps": reps, "threads": threads}
    r = subprocess.run([python, "-c", LLAMA_SCRIPT, json.dumps(args)], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"llama.cpp: not measured ({python} -c 'import llama_cpp' failed: "
              f"{(r.stderr.strip().splitlines() or ['?'])[-1]})")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def same(a: list[int], b: list[int]) -> str:
    return f"{sum(x == y for x, y in zip(a, b)) / max(len(a), 1):.0%}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="runs per engine; the best is reported")
    ap.add_argument("--prefill", type=int, default=512, help="prefill length in tokens")
    ap.add_argument("--prompt", default="The history of the printing press begins")
    ap.add_argument("--cpu-kernels", default=None, help="force a CPU path (auto|onednn|portable|reference)")
    ap.add_argument("--llama-python", default=os.environ.get("LLAMA_CPP_PYTHON", sys.executable))
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch and llama.cpp threads (default: torch's)")
    a = ap.parse_args()
    import worker_orcd
    from worker_orcd.packaged import default_model_path
    from worker_orcd.quant import cpu_caps

    kernels = cpu_caps.force(a.cpu_kernels) if a.cpu_kernels else cpu_caps.cpu_kernels()
    path = str(a.model or default_model_path())
    m = worker_orcd.load(path, device="cpu")
    ids = m.tokenize(a.prompt, add_special=True)
    text = (ROOT / "tests" / "data" / "ppl_text.txt").read_text(encoding="utf-8")
    prefill_ids = m.tokenize(text, add_special=True)[: a.prefill]
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    print(f"CPU: {cpu_name()}, torch {torch.__version__} threads {threads}, model {os.path.basename(path)}, "
          f"load {os.getloadavg()[0]:.1f}, env {env or '-'}")
    print(kernels.describe())
    (dec, dec_cpu), pre, our_ids = ours(m, ids, prefill_ids, a.tokens, a.reps)
    print("decode tok/s: wall clock / per CPU-second of the process (the second is steadier on a shared machine)")
    print(f"worker-orcd   decode {dec:7.1f} / {dec_cpu:7.1f}  prefill({len(prefill_ids)}) {pre:7.1f} tok/s")
    if not a.no_transformers:
        try:
            (hf, hf_cpu), hf_ids = transformers_speed(path, ids, a.tokens, a.reps)
        except (ImportError, ValueError, OSError) as e:  # transformers or accelerate missing
            print(f"transformers: not measured ({e})")
        else:
            print(f"transformers  decode {hf:7.1f} / {hf_cpu:7.1f}  (float32)  same greedy ids {same(our_ids, hf_ids)}")
            print(f"  ratio: decode {dec / hf:.2f}x / {dec_cpu / hf_cpu:.2f}x transformers")
    if not a.no_llama:
        ll = llama_cpp_speed(a.llama_python, path, ids, prefill_ids, a.tokens, a.reps, threads)
        if ll is not None:
            print(f"llama.cpp     decode {ll['decode']:7.1f} / {ll['decode_cpu']:7.1f}  prefill({len(prefill_ids)}) "
                  f"{ll['prefill']:7.1f} tok/s  (llama-cpp-python {ll['version']})  same greedy ids "
                  f"{same(our_ids, ll['ids'])}")
            print(f"  ratio: decode {dec / ll['decode']:.2f}x / {dec_cpu / ll['decode_cpu']:.2f}x llama.cpp, "
                  f"prefill {pre / ll['prefill']:.2f}x")

if __name__ == "__main__":
    main()
