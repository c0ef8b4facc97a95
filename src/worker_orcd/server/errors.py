"""Every error is JSON `{error: {code, message, field?}}`; never a traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

log = logging.getLogger("worker_orcd.server")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class APIError(HTTPException):
    """An HTTPException, so FastAPI passes it through unchanged when raised while it parses a body."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: int | None = None):
        super().__init__(status, message)
        self.status, self.code, self.message, self.field, self.retry_after = status, code, message, field, retry_after


def error_response(status: int, code: str, message: str, field: str | None = None,
                   retry_after: int | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message}}
    if field is not None:
        body["error"]["field"] = field
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse(body, status_code=status, headers=headers)


ERROR_RESPONSES = {
    status: {"model": ErrorBody, "description": what}
    for status, what in [(400, "Invalid request"), (404, "Unknown model or job"), (413, "Prompt or body too long"),
                         (415, "Body is not JSON"), (422, "Invalid field"), (429, "All sequences busy"),
                         (503, "Not ready or draining")]
}

_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 408: "REQUEST_TIMEOUT", 413: "PAYLOAD_TOO_LARGE",
               415: "UNSUPPORTED_MEDIA_TYPE"}


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _field(loc: tuple) -> str:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'; union member tags ('str') are dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part):
            break
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    field = _field(tuple(first.get("loc", ())))
    if first.get("type") == "json_invalid":
        return error_response(400, "INVALID_REQUEST", f"malformed JSON: {first.get('msg')}", "body")
    if first.get("type") == "missing" and field == "body":
        return error_response(400, "INVALID_REQUEST", "a JSON request body is required", "body")
    return error_response(422, "INVALID_REQUEST", f"{field}: {first.get('msg')}", field)


def install(app: FastAPI, on_error: Callable[[int], None] = lambda status: None) -> None:
    """JSON error handlers; `on_error(status)` sees every refused request (for metrics)."""

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        on_error(exc.status)
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.retry_after)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        response = _validation(request, exc)
        on_error(response.status_code)
        return response

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        field = "body" if exc.status_code == 400 else None  # FastAPI could not read the body
        return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "INVALID_REQUEST"), str(exc.detail),
                              field)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "INTERNAL", f"internal error: {type(exc).__name__}")
