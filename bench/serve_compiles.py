"""`worker-orcd serve` with what happens on the serving path logged to stderr: every Triton compile (a compile
while serving stalls every stream for ~0.1-1 s) and, with --trace-steps, every scheduler forward and every
request submitted, with wall-clock times, to see where a burst of requests waits.

Usage: python bench/serve_compiles.py [--trace-steps] [--switch-interval-ms MS] serve --model X.gguf ...
Lines: `triton-compile <unix time> <kernel>[options](<argument types and specializations>)`, and
`<forward|launch|land|submit> <unix time> <ms spent> <rows>` from the scheduler.
"""

from __future__ import annotations

import sys
import time

from triton import knobs


def log_compile(*, repr: str, **_) -> bool:  # noqa: A002 (Triton's keyword)
    print(f"triton-compile {time.time():.3f} {repr}", file=sys.stderr, flush=True)
    return False  # go on and compile


def trace_steps() -> None:
    from worker_orcd.engine.scheduler import Scheduler

    def timed(name, method, describe):
        def wrapper(self, *a):
            what, t0 = describe(self, *a), time.time()
            out = method(self, *a)
            print(f"{name} {t0:.4f} {1000 * (time.time() - t0):.1f} {what}", file=sys.stderr, flush=True)
            return out
        return wrapper

    Scheduler._forward = timed("forward", Scheduler._forward, lambda self, decoding, prefills: (
        f"decode={len(decoding)} prefill={len(prefills)}/{sum(self._chunk_len(p) for p in prefills)}"))
    Scheduler._launch = timed("launch", Scheduler._launch,  # (the riders too: a TypeError here turned the overlap off)
                              lambda self, rows, last, riders=(): f"decode={len(rows)} riders={len(riders)}")
    Scheduler._land = timed("land", Scheduler._land, lambda self, step: f"rows={len(step.seqs)}")
    Scheduler.submit = timed("submit", Scheduler.submit, lambda self, *a: "")


if __name__ == "__main__":
    knobs.runtime.jit_cache_hook = log_compile
    args = sys.argv[1:]
    if args[:1] == ["--trace-steps"]:
        trace_steps()
        args = args[1:]
    if args[:1] == ["--switch-interval-ms"]:  # the GIL's hand-over interval (Python's default: 5 ms)
        sys.setswitchinterval(float(args[1]) / 1000)
        args = args[2:]
    from worker_orcd.cli import main

    sys.argv = ["worker-orcd", *args]
    main()
