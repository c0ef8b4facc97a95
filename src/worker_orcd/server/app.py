"""The FastAPI app: worker API, OpenAI API and /metrics over one Worker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from worker_orcd import __version__
from worker_orcd.server import errors, openai_api, worker_api
from worker_orcd.server.auth import APIKeyAuth
from worker_orcd.server.limits import BodyLimit
from worker_orcd.server.worker import Worker, drain


def create_app(worker: Worker, exit_server: Callable[[], None] | None = None) -> FastAPI:
    """`exit_server` is called once a drain (POST /shutdown or SIGTERM) has finished."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.scheduler.stop)

    app = FastAPI(title="worker-orcd", version=__version__, lifespan=lifespan,
                  description="One GGUF model: the worker API (SSE) and an OpenAI-compatible API.")
    app.state.worker = worker
    tasks: set[asyncio.Task] = set()

    def begin_shutdown() -> None:
        if worker.draining:
            return
        task = asyncio.get_running_loop().create_task(
            drain(worker, exit_server or (lambda: None), worker.cfg.drain_timeout_sec))
        tasks.add(task)  # keep a reference so the task is not collected mid-drain
        worker.draining = True

    app.state.begin_shutdown = begin_shutdown
    def refused(status: int) -> None:
        outcome = "rejected" if status in (429, 503) else "invalid"
        worker.metrics.requests.labels(outcome=outcome).inc()

    errors.install(app, refused)
    app.add_middleware(BodyLimit, max_bytes=worker.cfg.max_body_bytes, timeout_s=worker.cfg.read_timeout_sec,
                       on_error=refused)
    if worker.cfg.api_key:
        app.add_middleware(APIKeyAuth, key=worker.cfg.api_key, on_error=refused)  # outside BodyLimit: no body read
    if worker.cfg.allowed_origins:  # outermost: preflight requests carry no key
        app.add_middleware(CORSMiddleware, allow_origins=worker.cfg.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.include_router(worker_api.router)
    app.include_router(openai_api.router)

    @app.get("/metrics", tags=["worker"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def metrics(request: Request) -> Response:
        return Response(worker.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    _pin_model_names(app, worker.served_names)
    return app


def _pin_model_names(app: FastAPI, names: list[str]) -> None:
    """The schema names the one model served here, so clients and fuzzers see which `model` is valid."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = base()
            for name, body in schema.get("components", {}).get("schemas", {}).items():
                prop = body.get("properties", {}).get("model")
                if prop is None or name not in ("CompletionRequest", "ChatRequest", "TokenizeRequest",
                                                "DetokenizeRequest"):
                    continue
                pinned = {"type": "string", "enum": list(names)}
                body["properties"]["model"] = ({"anyOf": [pinned, {"type": "null"}]} if "anyOf" in prop else pinned)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
