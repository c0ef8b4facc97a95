"""The timings the unit tests used to assert, measured here instead (issue 17: unit tests count operations).

Usage: python bench/unit_timings.py [--check] [--only NAME ...]
  scheduler   1 vs 8 requests through the scheduler (no HTTP; bench/serve_throughput.py does it over HTTP):
              aggregate tokens/s and the ratio (the unit test's old floor: 8 streams > 1.3x one stream)
  prefill     a running stream's tokens/s while a 401-token prompt prefills in 64-token chunks beside it
              (old floor: >= 4 tokens of the running stream during the prefill)
  render      one chat-template render of 16 messages in the sandbox (old limit: < 20 ms)
  stop        2,000 one-character pushes through 16 adversarial 512-character stop strings (old limit: < 0.5 s)
Prints one JSON line per measurement; --check exits 1 when one misses its old limit (on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And <b>3+3</b> & \"quotes\"?"},
]


def _net():
    import torch

    from worker_orcd.gguf import open_gguf
    from worker_orcd.models.registry import build_model
    from worker_orcd.packaged import default_model_path

    with open_gguf(default_model_path()) as f:
        return build_model(f, torch.device("cpu"))


def _prompt(i: int, n: int = 12) -> list[int]:
    return [1] + [(1000 + 37 * i + 11 * k) % 40000 + 100 for k in range(n)]


def scheduler(net) -> dict:
    from tests.test_scheduler import IdTokenizer, tokens_of
    from worker_orcd.engine.scheduler import Request, Scheduler

    s = Scheduler(net, IdTokenizer(), max_batch=8, ctx=512, prefill_chunk=64).start()
    try:
        reqs = [Request(f"r{i}", _prompt(i, 3 + 4 * i), 32) for i in range(8)]
        t0 = time.perf_counter()
        alone = [len(tokens_of(s.submit(r))[0]) for r in reqs]
        t1 = time.perf_counter()
        handles = [s.submit(Request(r.id + "b", r.prompt_ids, r.max_tokens)) for r in reqs]
        together = [len(tokens_of(h)[0]) for h in handles]
        t2 = time.perf_counter()
    finally:
        s.stop()
    rate1, rate8 = sum(alone) / (t1 - t0), sum(together) / (t2 - t1)
    return {"name": "scheduler", "tok_s_1": round(rate1, 1), "tok_s_8": round(rate8, 1),
            "ratio": round(rate8 / rate1, 2), "ok": rate8 > 1.3 * rate1}


def prefill(net) -> dict:
    from tests.test_scheduler import IdTokenizer, tokens_of
    from worker_orcd.engine.scheduler import Request, Scheduler, TokenEvent

    s = Scheduler(net, IdTokenizer(), max_batch=8, ctx=512, prefill_chunk=64).start()
    times: list[float] = []
    try:
        def stamp(event) -> None:
            if isinstance(event, TokenEvent):
                times.append(time.perf_counter())

        running = s.submit(Request("run", _prompt(7), 300), on_event=stamp)
        while len(times) < 5:
            time.sleep(0.01)
        t0 = time.perf_counter()
        tokens_of(s.submit(Request("long", _prompt(8, 400), 2)))
        t1 = time.perf_counter()
        s.cancel("run")
        while not running.done:
            time.sleep(0.01)
    finally:
        s.stop()
    during = [t for t in times if t0 <= t <= t1]
    before = times[:5]
    return {"name": "prefill", "running_tokens_during": len(during), "prefill_s": round(t1 - t0, 3),
            "running_tok_s_before": round(4 / (before[-1] - before[0]), 1), "ok": len(during) >= 4}


def render() -> dict:
    from worker_orcd.packaged import default_model_path
    from worker_orcd.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_path())
    messages = CONVERSATION * 4
    tok.apply_chat_template(messages)
    n, t0 = 200, time.perf_counter()
    for _ in range(n):
        tok.apply_chat_template(messages)
    per = (time.perf_counter() - t0) / n
    return {"name": "render", "messages": len(messages), "ms_per_render": round(per * 1e3, 3), "ok": per < 0.02}


def stop() -> dict:
    from worker_orcd.engine.stop import StopMatcher

    stops = ["c" + "a" * 510 + chr(100 + i) for i in range(15)] + ["a" * 511 + "b"]
    m = StopMatcher(stops)
    t0 = time.perf_counter()
    for _ in range(2000):
        m.push("a")
    dt = time.perf_counter() - t0
    return {"name": "stop", "pushes": 2000, "stops": 16, "s": round(dt, 4), "us_per_push": round(dt / 2000 * 1e6, 1),
            "ok": dt < 0.5}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a measurement misses its old unit-test limit")
    ap.add_argument("--only", nargs="*", choices=["scheduler", "prefill", "render", "stop"])
    args = ap.parse_args()
    only = set(args.only or ["scheduler", "prefill", "render", "stop"])
    results = []
    if only & {"scheduler", "prefill"}:
        net = _net()
        results += [f(net) for name, f in (("scheduler", scheduler), ("prefill", prefill)) if name in only]
    results += [f() for name, f in (("render", render), ("stop", stop)) if name in only]
    for r in results:
        print(json.dumps(r))
    return 1 if args.check and not all(r["ok"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
