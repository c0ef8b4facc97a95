"""A real server for tests: `serve()` on a loopback port in a thread, and an SSE reader."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx

from worker_orcd.server import ServeConfig, Worker, serve

PROMPTS = [
    "The history of the printing press",
    "Photosynthesis is the process by which",
    "My favourite recipe for bread is",
    "The tallest mountains in the world",
    "In computer science, a hash table",
    "The rules of chess say that",
    "A short poem about autumn:",
    "The French Revolution began when",
]


class LiveServer:
    """`serve()` in a thread with its own event loop; `uri` once the worker reports ready."""

    def __init__(self, model, cfg: ServeConfig):
        self.worker = Worker(model, cfg)
        self.uri: str | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(serve(self.worker, self._on_ready)), daemon=True)

    def _on_ready(self, uri: str) -> None:
        self.uri = uri
        self._ready.set()

    def __enter__(self) -> LiveServer:
        self._thread.start()
        assert self._ready.wait(60), "the server did not become ready"
        return self

    def __exit__(self, *exc) -> None:
        try:
            httpx.post(self.uri + "/shutdown", timeout=10)
        except httpx.TransportError:  # already shut down by the test
            pass
        self._thread.join(40)
        assert not self._thread.is_alive(), "the server did not exit after /shutdown"


def sse_events(resp: httpx.Response):
    """(event name, data) per SSE event; each event's bytes must decode as UTF-8 on their own."""
    buf = b""
    for chunk in resp.iter_bytes():
        buf += chunk
        while b"\n\n" in buf:
            raw, buf = buf.split(b"\n\n", 1)
            text = raw.decode("utf-8")  # strict: a split multi-byte character fails here
            name = next((ln[7:] for ln in text.split("\n") if ln.startswith("event: ")), None)
            data = next(ln[6:] for ln in text.split("\n") if ln.startswith("data: "))
            yield name, data if data == "[DONE]" else json.loads(data)
