"""Token-mask time per token for JSON-schema output: llguidance vs xgrammar on a 49k, 152k and 262k vocabulary.

For each tokenizer and engine: build the engine's tokenizer (once per model), compile a schema (once per
request), then walk 256 tokens: compute the mask, pick the allowed token with the highest fixed random
logit (so both engines walk valid JSON), advance. Reports milliseconds per token (p50/p99/mean) for the
mask alone and with its conversion to a bool tensor and the masked fill the server does.
Run: PYTHONPATH=src python bench/grammar_mask.py [--tokens 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from worker_orcd.packaged import default_model_path, gemma3_270m_path
from worker_orcd.server.structured import ENGINES, GrammarConstraint, engine_tokenizer
from worker_orcd.tokenizer import load_tokenizer

SCHEMA = {"type": "object", "required": ["name", "age", "tags", "city"], "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
                         "city": {"enum": ["Paris", "Oslo", "Lima"]}}}


def walk(tok, engine: str, n_tokens: int, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    engine_tokenizer(tok, engine)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = GrammarConstraint(tok, 0, schema=SCHEMA, engine=engine)
    t_compile = time.perf_counter() - t0
    logits = torch.randn(tok.vocab_size, generator=torch.Generator().manual_seed(seed))
    fill, full, out = [], [], []
    for _ in range(n_tokens):
        t0 = time.perf_counter()
        c.fill()
        t1 = time.perf_counter()
        masked = logits.masked_fill(~c.allowed(), float("-inf"))
        t2 = time.perf_counter()
        fill.append((t1 - t0) * 1e3)
        full.append((t2 - t0) * 1e3)
        token = int(torch.argmax(masked))
        if token in tok.eog_ids:
            break
        out.append(token)
        c.accept(token)
        logits = torch.roll(logits, 7919)  # a different preference each step, the same for both engines
    q = statistics.quantiles
    return {"vocab": tok.vocab_size, "engine": engine, "tokenizer_s": t_tok, "compile_ms": t_compile * 1e3,
            "tokens": len(fill), "mask_p50": q(fill, n=100)[49], "mask_p99": q(fill, n=100)[98],
            "mask_mean": statistics.fmean(fill), "total_mean": statistics.fmean(full),
            "text": tok.detokenize(out)[:60]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokenizers = [("SmolLM2", load_tokenizer(default_model_path())),
                  ("Qwen2", load_tokenizer("/work/shared/vocab/ggml-vocab-qwen2.gguf")),
                  ("Gemma 3", load_tokenizer(gemma3_270m_path()))]
    print("| vocab | engine | tokenizer build s | schema compile ms | mask ms/token p50 / p99 / mean | "
          "mask + apply ms mean | tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, tok in tokenizers:
        for engine in ENGINES:
            r = walk(tok, engine, args.tokens)
            print(f"| {name} {r['vocab']:,} | {engine} | {r['tokenizer_s']:.2f} | {r['compile_ms']:.1f} | "
                  f"{r['mask_p50']:.3f} / {r['mask_p99']:.3f} / {r['mask_mean']:.3f} | {r['total_mean']:.3f} | "
                  f"{r['tokens']} |", flush=True)


if __name__ == "__main__":
    main()
