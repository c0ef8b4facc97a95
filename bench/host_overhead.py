"""What serving costs the host per step, without a model: a network whose forward is free, behind the real
scheduler and HTTP server, N concurrent streaming /execute requests (bench/serve_throughput.py, its own process).

Usage: python bench/host_overhead.py [--streams 64] [--tokens 64] [--rounds 3]

The net returns logits that put every row on a fixed ordinary token of GPT-2's vocabulary (50,257 ids), so
the step time is the scheduler's bookkeeping, the pick, detokenizing, stop checks, and the event loop's SSE
writes: the host work that a GPU step either hides or adds to. Prints tok/s and ms per step of N rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from server_helpers import LiveServer  # noqa: E402

from worker_orcd.engine.kv_cache import KVCache, SeqSpan  # noqa: E402
from worker_orcd.server import ServeConfig  # noqa: E402
from worker_orcd.tokenizer import load_tokenizer  # noqa: E402

VOCAB = Path("/work/shared/vocab/ggml-vocab-gpt-2.gguf")


class FreeNet:
    """forward() costs one small fill: row r picks token 300 + position % 1000 (plain BPE pieces)."""

    def __init__(self, vocab: int):
        self.device = torch.device("cpu")
        self.vocab = vocab

    def new_kv_cache(self, max_len: int, n_slots: int = 1, dtype: torch.dtype | None = None,
                     n_blocks: int | None = None) -> KVCache:
        return KVCache(1, 1, 1, max_len, n_slots, dtype or torch.float32, self.device, n_blocks=n_blocks)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KVCache, seqs: list[SeqSpan] | None = None,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = torch.arange(len(tokens)) if logit_rows is None else logit_rows
        logits = torch.zeros(len(rows), self.vocab)
        logits[torch.arange(len(rows)), 300 + positions[rows] % 1000] = 10.0
        return logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tok = load_tokenizer(VOCAB)
    net = FreeNet(tok.vocab_size)
    config = SimpleNamespace(architecture="gpt2", context_length=2048, vocab_size=tok.vocab_size)
    model = SimpleNamespace(net=net, tokenizer=tok, config=config, path=VOCAB, device=net.device)
    cfg = ServeConfig(max_batch=args.streams, ctx=1024)
    with LiveServer(model, cfg) as server:
        steps0 = server.worker.scheduler.steps
        t0 = time.perf_counter()
        client = subprocess.run([sys.executable, str(Path(__file__).with_name("serve_throughput.py")), "--url",
                                 server.uri, "--streams", str(args.streams), "--tokens", str(args.tokens), "--rounds",
                                 str(args.rounds), "--no-alone"], capture_output=True, text=True, check=True)
        r = json.loads(client.stdout.splitlines()[0])
        wall = time.perf_counter() - t0
        steps = server.worker.scheduler.steps - steps0
    print(f"{platform.processor() or platform.machine()}: {args.streams} streams x {args.tokens} tokens, "
          f"{args.rounds} rounds: {r['n_streams_tok_s']:,.0f} tok/s (last round), {steps} steps in {wall:.2f} s "
          f"= {1000 * wall / max(steps, 1):.2f} ms a step, TTFT p50/p99 {r['ttft_p50_ms']}/{r['ttft_p99_ms']} ms")


if __name__ == "__main__":
    main()
