"""Serving a loaded model: uvicorn, the orchestrator's ready callback, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import time
import urllib.request
from collections.abc import Callable

import uvicorn

from worker_orcd.server.app import create_app
from worker_orcd.server.limits import guarded_protocol
from worker_orcd.server.worker import Worker

log = logging.getLogger("worker_orcd.server")

CALLBACK_PATH = "/v2/internal/workers/ready"


class _Server(uvicorn.Server):
    """SIGTERM/SIGINT drain first (running streams finish), then uvicorn exits."""

    def __init__(self, config: uvicorn.Config, worker: Worker):
        super().__init__(config)
        self.worker = worker
        self.begin_shutdown: Callable[[], None] | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.begin_shutdown is None or self.worker.draining:
            super().handle_exit(sig, frame)  # a second signal: exit now
            return
        self.begin_shutdown()


def post_ready(callback_url: str, body: dict, attempts: int = 5) -> None:
    """POST {callback}/v2/internal/workers/ready; retried with backoff, raises on the last failure."""
    url = callback_url.rstrip("/") + CALLBACK_PATH
    data = json.dumps(body).encode()
    for attempt in range(attempts):
        try:
            req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
            return
        except OSError as e:
            if attempt == attempts - 1:
                raise RuntimeError(f"ready callback to {url} failed: {e}") from e
            log.warning("ready callback to %s failed (%s); retrying", url, e)
            time.sleep(0.5 * 2**attempt)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, bound (not yet listening) before any weight is loaded, so a busy port is a
    one-line error up front. Raises OSError naming the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses TIME_WAIT ports
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = "already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


async def serve(worker: Worker, on_ready: Callable[[str], None] | None = None,
                sock: socket.socket | None = None) -> None:
    """Listen (on `sock` when given, from `bind_socket`), then report ready (callback first, when configured);
    returns after a drain."""
    cfg = worker.cfg
    server: _Server | None = None

    def exit_server() -> None:
        server.should_exit = True

    app = create_app(worker, exit_server)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, http=guarded_protocol(cfg.read_timeout_sec))
    server = _Server(config, worker)
    task = asyncio.create_task(server.serve(sockets=[sock] if sock is not None else None))
    while not server.started:
        if task.done():
            return await task  # failed to bind: uvicorn logged why
        await asyncio.sleep(0.02)
    server.begin_shutdown = app.state.begin_shutdown
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else cfg.port
    uri = f"http://{cfg.host}:{port}"
    if cfg.callback_url:
        body = {"worker_id": cfg.worker_id, "model_ref": worker.model_id, "vram_bytes": worker.vram_bytes, "uri": uri}
        try:
            await asyncio.to_thread(post_ready, cfg.callback_url, body)
        except RuntimeError as e:
            log.error("%s", e)
            worker.failed = True
            server.should_exit = True
            await task
            raise
    worker.ready = True
    log.info("ready worker_id=%s model=%s uri=%s vram_bytes=%d", cfg.worker_id, worker.model_id, uri,
             worker.vram_bytes)
    if on_ready is not None:
        on_ready(uri)
    await task
