"""Aggregate decode throughput through HTTP: 1 stream, then N concurrent streams, on `worker-orcd serve`.

Usage: python bench/serve_throughput.py [--model PATH] [--streams 8] [--tokens 64] [--url URL] [--openai]

Starts `worker-orcd serve` (CPU unless --device) on a free loopback port in its own process (or uses
--url), sends greedy /execute requests (--openai: streaming /v1/completions) with asyncio + httpx, and reports
generated tokens per second of wall time for one stream alone and for N at once, with each stream's text
checked against its text alone. Tokens/s counts generated tokens over the whole request (prefill included), as
a client sees it. A burst of more than CLIENT_STREAMS streams is sent from several client processes started
together. bench/gpu.py --http runs it beside the engine's own figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time

import httpx
from soak import PROMPTS as SOAK_PROMPTS  # bench/ is on sys.path when this runs as a script

PROMPTS = SOAK_PROMPTS[:8]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, device: str, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "worker_orcd.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--device", device, "--max-batch", str(max_batch), "--ctx", "1024"]
    if model:
        cmd += ["--model", model]
    log = open(os.environ["SERVE_LOG"], "w") if os.environ.get("SERVE_LOG") else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready in 120 s")


async def _read_events(resp: httpx.Response, token_mark: bytes, start: float,
                       ttft: list[float] | None) -> list[bytes]:
    """The response's raw SSE bytes, parsed after the round: at 64 streams the client's per-line parsing (httpx's
    line splitting and a json.loads an event, ~12,000 lines a round in one Python thread) took as long as the
    round (session 12: the server finished each request within 0.44 s of taking it, the client measured 0.79 s).
    TTFT: the arrival of the first chunk holding `token_mark` followed by a non-empty value."""
    chunks: list[bytes] = []
    tail = b""
    async for chunk in resp.aiter_bytes():
        if ttft is not None and tail is not None:
            buf = tail + chunk
            at = buf.find(token_mark)
            while at >= 0 and buf[at + len(token_mark) : at + len(token_mark) + 1] == b'"':  # an empty text
                at = buf.find(token_mark, at + 1)
            if at >= 0:
                ttft.append(time.perf_counter() - start)
                tail = None
            else:
                tail = buf[-len(token_mark) :]
        chunks.append(chunk)
    return chunks


def _sse_lines(chunks: list[bytes]):
    for line in b"".join(chunks).decode().split("\n"):
        yield line.rstrip("\r")


async def one_stream(client: httpx.AsyncClient, job_id: str, prompt: str, n_tokens: int,
                     ttft: list[float] | None = None) -> tuple[str, int]:
    body = {"job_id": job_id, "prompt": prompt, "max_tokens": n_tokens, "temperature": 0.0}
    text, tokens = [], 0
    start = time.perf_counter()
    async with client.stream("POST", "/execute", json=body) as resp:
        resp.raise_for_status()
        chunks = await _read_events(resp, b"event: token", start, ttft)
    event = None
    for line in _sse_lines(chunks):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            if event == "token":
                text.append(data["t"])
            elif event == "end":
                tokens = data["tokens_out"]
            elif event == "error":
                raise RuntimeError(f"{job_id}: {data}")
    return "".join(text), tokens


async def one_completion(client: httpx.AsyncClient, job_id: str, prompt: str, n_tokens: int,
                         ttft: list[float] | None = None) -> tuple[str, int]:
    """one_stream's result through the OpenAI API: a streaming greedy /v1/completions (the count from the
    usage chunk that stream_options.include_usage adds)."""
    body = {"prompt": prompt, "max_tokens": n_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "user": job_id}
    text, tokens = [], 0
    start = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        chunks = await _read_events(resp, b'"text": "', start, ttft)
    for line in _sse_lines(chunks):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        data = json.loads(line[6:])
        if "error" in data:
            raise RuntimeError(f"{job_id}: {data}")
        for choice in data.get("choices") or []:
            if choice.get("text"):
                text.append(choice["text"])
        if data.get("usage"):
            tokens = data["usage"]["completion_tokens"]
    return "".join(text), tokens


# Streams a client process drives in a burst. One asyncio process opening 64 connections and reading their
# events was the slower side of a 64-stream round on the H200 (session 12: the server took the requests over 167
# ms and finished each within 0.56 s of the first; the client measured 0.77 s), so a burst of more streams runs
# in processes of this many, started together; the round lasts from the first's start to the last's end.
CLIENT_STREAMS = 16


async def _burst_in_processes(url: str, n_streams: int, n_tokens: int, r: int, openai: bool
                              ) -> tuple[list[tuple[str, int]], list[float], float]:
    """One round of n_streams at once from ceil(n_streams / CLIENT_STREAMS) client processes (this script with
    --part): (each stream's (text, tokens) in order, the TTFTs, the round's wall time)."""
    start_at = time.time() + 3.0  # every process imported and waiting
    procs = []
    for lo in range(0, n_streams, CLIENT_STREAMS):
        hi = min(n_streams, lo + CLIENT_STREAMS)
        cmd = [sys.executable, __file__, "--url", url, "--part", f"{lo}:{hi}", "--start-at", repr(start_at),
               "--round", str(r), "--tokens", str(n_tokens), *(["--openai"] if openai else [])]
        procs.append(await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE))
    parts = []
    for proc in procs:
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"a client process failed ({proc.returncode})")
        parts.append(json.loads(out))
    together = [(t, n) for part in parts for t, n in part["streams"]]
    ttft = [v for part in parts for v in part["ttft"]]
    return together, ttft, max(p["end"] for p in parts) - min(p["start"] for p in parts)


async def _part(url: str, lo: int, hi: int, start_at: float, r: int, n_tokens: int, openai: bool) -> dict:
    """A client process's share of a burst: streams lo..hi-1, started at start_at (wall clock)."""
    stream = one_completion if openai else one_stream
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        start, ttft = time.time(), []
        out = await asyncio.gather(*(stream(client, f"b{r}-{i}", PROMPTS[i % len(PROMPTS)], n_tokens, ttft)
                                     for i in range(lo, hi)))
        return {"streams": out, "ttft": ttft, "start": start, "end": time.time()}


async def measure(url: str, n_streams: int, n_tokens: int, rounds: int = 1, alone_too: bool = True,
                  openai: bool = False, warm_connections: bool = False) -> dict:
    """Each prompt alone (unless not alone_too), then all at once `rounds` times (the last round reported).
    warm_connections: the N connections are opened (N concurrent one-token requests) before the timed rounds, as
    an orchestrator's pool would keep them; by default the burst opens them itself. (H200, session 8: warm, a
    burst of 64 reached the scheduler one request per ~10 ms, each waiting for the GIL between the scheduler's
    eager prefill forwards, and gave 2,350-2,640 tok/s; cold 2,920-3,320. TCP_NODELAY made no difference.)"""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_streams)]
    stream = one_completion if openai else one_stream
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await stream(client, "warmup", "Hello", 8)
        if warm_connections:
            await asyncio.gather(*(stream(client, f"w{i}", "Hello", 1) for i in range(n_streams)))
        alone, t_alone = [], 0.0
        for i, p in enumerate(prompts if alone_too else []):
            t0 = time.perf_counter()
            alone.append(await stream(client, f"a{i}", p, n_tokens))
            t_alone += time.perf_counter() - t0
        for r in range(rounds):
            if n_streams > CLIENT_STREAMS and not warm_connections:
                together, ttft, t_together = await _burst_in_processes(url, n_streams, n_tokens, r, openai)
                continue
            t0 = time.perf_counter()
            ttft = []
            together = await asyncio.gather(*(stream(client, f"b{r}-{i}", p, n_tokens, ttft)
                                              for i, p in enumerate(prompts)))
            t_together = time.perf_counter() - t0
    ttft.sort()
    rate1 = sum(n for _, n in alone) / t_alone if alone else float("nan")
    rate_n = sum(n for _, n in together) / t_together
    return {"streams": n_streams, "tokens_per_stream": n_tokens, "one_stream_tok_s": round(rate1, 1),
            "n_streams_tok_s": round(rate_n, 1), "ratio": round(rate_n / rate1, 2),
            "texts_equal_alone": [t for t, _ in together] == [t for t, _ in alone] if alone else None,
            "ttft_p50_ms": round(1000 * ttft[len(ttft) // 2], 1),
            "ttft_p99_ms": round(1000 * ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--url", help="an already running worker (otherwise one is started)")
    ap.add_argument("--rounds", type=int, default=1, help="run the N streams together this many times")
    ap.add_argument("--no-alone", action="store_true", help="skip the streams alone (no text check)")
    ap.add_argument("--max-batch", type=int, help="the server's --max-batch (default: max(8, streams))")
    ap.add_argument("--openai", action="store_true", help="streaming /v1/completions instead of /execute")
    ap.add_argument("--warm-connections", action="store_true",
                    help="open the N connections before the timed burst (default: the burst opens them); "
                         "one client process")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # lo:hi, a client process of a burst (_burst_in_processes)
    ap.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        lo, hi = map(int, args.part.split(":"))
        print(json.dumps(asyncio.run(_part(args.url, lo, hi, args.start_at, args.round, args.tokens, args.openai))))
        return
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.model, args.device, args.max_batch or max(8, args.streams))
    try:
        result = asyncio.run(measure(url, args.streams, args.tokens, args.rounds, not args.no_alone, args.openai,
                                     args.warm_connections))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    result["cpu"] = platform.processor() or platform.machine()
    result["cores"] = os.cpu_count()
    print(json.dumps(result))
    print(f"1 stream {result['one_stream_tok_s']} tok/s | {args.streams} streams {result['n_streams_tok_s']} tok/s "
          f"| {result['ratio']}x | TTFT p50/p99 {result['ttft_p50_ms']}/{result['ttft_p99_ms']} ms "
          f"| texts equal alone: {result['texts_equal_alone']}")
    if result["texts_equal_alone"] is False:
        sys.exit(1)


if __name__ == "__main__":
    main()
