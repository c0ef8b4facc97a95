"""The worker API an orchestrator uses: execute (SSE), cancel, health, ready, shutdown."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from worker_orcd.engine.scheduler import EndEvent, ErrorEvent, TokenEvent
from worker_orcd.server import sse
from worker_orcd.server.auth import is_loopback
from worker_orcd.server.errors import ERROR_RESPONSES, APIError, ErrorBody, error_response
from worker_orcd.server.json_body import StrictJSONRoute
from worker_orcd.server.schemas import Accepted, CancelRequest, ExecuteRequest, Health
from worker_orcd.server.worker import Stream, Worker, sampling_params, stop_fields

router = APIRouter(tags=["worker"], route_class=StrictJSONRoute)

RETRIABLE = {"INFERENCE_TIMEOUT": True, "CANCELLED": False, "INTERNAL": True, "VRAM_OOM": True, "CUDA_ERROR": False}


def _worker(request: Request) -> Worker:
    return request.app.state.worker


@router.post("/execute", responses={**sse.SSE_RESPONSE, **ERROR_RESPONSES})
async def execute(body: ExecuteRequest, request: Request) -> sse.EventStream:
    """Run one job; events: started, token*, metrics, end — or error."""
    w = _worker(request)
    if w.scheduler.active(body.job_id):
        raise APIError(400, "INVALID_REQUEST", f"job_id {body.job_id!r} is already running", "job_id")
    ids = await w.tokenize(body.prompt, "prompt")
    max_tokens = w.check_lengths(len(ids), body.max_tokens, "prompt")
    w.check_extras(body)
    params = sampling_params(body.temperature, body.top_p, body.top_k, body.seed, body)
    stream = w.submit(body.job_id, ids, max_tokens, params, body.stop, "execute", **stop_fields(body))
    return sse.EventStream(_execute_events(stream, w.model_id), stream.close)


async def _execute_events(stream: Stream, model: str) -> AsyncIterator[str]:
    job = stream.request.id
    started = datetime.now(timezone.utc).isoformat()
    yield sse.event("started", {"job_id": job, "model": model, "started_at": started})
    async for ev in stream.events():
        if isinstance(ev, TokenEvent):
            if ev.text:
                yield sse.event("token", {"t": ev.text, "i": ev.index})
        elif isinstance(ev, EndEvent):
            st = ev.stats
            tps = st.completion_tokens / (st.decode_ms / 1000) if st.decode_ms > 0 else None
            yield sse.event("metrics", {"prompt_tokens": st.prompt_tokens, "cached_tokens": st.cached_tokens,
                                        "tokens_out": st.completion_tokens,
                                        "time_to_first_token_ms": st.ttft_ms, "decode_time_ms": st.decode_ms,
                                        "tokens_per_sec": tps})
            yield sse.event("end", {"tokens_out": st.completion_tokens, "decode_time_ms": round(st.decode_ms, 3),
                                    "stop_reason": ev.finish_reason})
        elif isinstance(ev, ErrorEvent):
            yield sse.event("error", {"code": ev.code, "message": ev.message,
                                      "retriable": RETRIABLE.get(ev.code, False)})


@router.post("/cancel", status_code=202, response_model=Accepted, responses=ERROR_RESPONSES)
async def cancel(body: CancelRequest, request: Request) -> Accepted:
    """Cancel a job (idempotent): its stream ends with error CANCELLED within one decode step."""
    found = _worker(request).scheduler.cancel(body.job_id)
    return Accepted(job_id=body.job_id, status="cancelling" if found else "not_running")


@router.get("/health", response_model=Health)
async def health(request: Request) -> Health:
    w = _worker(request)
    return Health(status=w.status, model=w.model_id, vram_bytes=w.vram_bytes,
                  uptime_seconds=round(time.monotonic() - w.started, 3),
                  architecture=w.architecture, quant=w.quant, device=str(w.model.device),
                  vram_resident=w.vram_resident)


@router.get("/ready", responses={200: {"description": "ready"}, 503: ERROR_RESPONSES[503]})
async def ready(request: Request) -> JSONResponse:
    w = _worker(request)
    if w.status in ("ready", "busy"):
        return JSONResponse({"ready": True, "status": w.status})
    return error_response(503, "NOT_READY", f"the worker is {w.status}", retry_after=1)


@router.post("/shutdown", status_code=202, response_model=Accepted,
             responses={401: ERROR_RESPONSES[401], 403: {"model": ErrorBody, "description": "Not from loopback"}})
async def shutdown(request: Request) -> Accepted:
    """Drain: new work gets 503, running jobs finish, then the process exits 0. Needs the API key; without
    one configured, only a client on this machine may ask."""
    w = _worker(request)
    if not w.cfg.api_key and not is_loopback(request.client.host if request.client else None):
        raise APIError(403, "FORBIDDEN", "shutdown is only accepted from this machine (loopback) when no "
                                         "--api-key is set")
    request.app.state.begin_shutdown()
    return Accepted(status="draining")
