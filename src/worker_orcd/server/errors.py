"""Every error is JSON, never a traceback, in one of two shapes.

The OpenAI API (`/v1/...`, `/tokenize`, `/detokenize`) answers as OpenAI does,
`{"error": {"message", "type", "param", "code"}}`: 400 for any invalid request (vLLM and OpenAI never send
422), 400 `context_length_exceeded` for a prompt past the context, 404 `model_not_found`, 401
`invalid_api_key`. The worker API keeps the llama-orch shape `{"error": {"code", "message", "field"?}}`
with 422 for an invalid field and 413 for a prompt past the context.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

log = logging.getLogger("worker_orcd.server")

OPENAI_PATHS = ("/v1/", "/tokenize", "/detokenize")


def is_openai(path: str) -> bool:
    """Whether `path` belongs to the OpenAI-compatible API (and so gets OpenAI's error shape)."""
    return path.startswith(OPENAI_PATHS)


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


class APIError(HTTPException):
    """An HTTPException, so FastAPI passes it through unchanged when raised while it parses a body."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: int | None = None):
        super().__init__(status, message)
        self.status, self.code, self.message, self.field, self.retry_after = status, code, message, field, retry_after


# our codes that OpenAI names differently; any other code is sent lower-cased
_OPENAI_CODES = {"PROMPT_TOO_LONG": "context_length_exceeded", "MODEL_NOT_FOUND": "model_not_found",
                 "UNAUTHORIZED": "invalid_api_key", "UNSUPPORTED_FIELD": "unsupported_parameter",
                 "UNKNOWN_FIELD": "unknown_parameter", "MISSING_FIELD": "missing_required_parameter",
                 "INVALID_REQUEST": "invalid_value"}
_OPENAI_TYPES = {401: "invalid_request_error", 429: "rate_limit_error", 499: "cancelled_error",
                 503: "service_unavailable_error", 504: "timeout_error"}


def openai_error(status: int, code: str, message: str, param: str | None = None) -> tuple[int, dict]:
    """(status, body) of an error as the OpenAI API sends it."""
    if status == 422 or code == "PROMPT_TOO_LONG":
        status = 400
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code_out = _OPENAI_CODES.get(code, code.lower())
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code_out}}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   retry_after: int | None = None, openai: bool = False) -> JSONResponse:
    if openai:
        status, body = openai_error(status, code, message, field)
    else:
        body = {"error": {"code": code, "message": message}}
        if field is not None:
            body["error"]["field"] = field
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=status, headers=headers)


ERROR_RESPONSES = {
    status: {"model": ErrorBody, "description": what}
    for status, what in [(400, "Invalid request"), (401, "Missing or wrong API key"), (404, "Unknown job"),
                         (413, "Prompt or body too long"), (415, "Body is not JSON"), (422, "Invalid field"),
                         (429, "All sequences busy"), (503, "Not ready or draining")]
}
OPENAI_ERROR_RESPONSES = {
    status: {"model": OpenAIErrorBody, "description": what}
    for status, what in [(400, "Invalid request (context_length_exceeded: prompt past the context)"),
                         (401, "Missing or wrong API key"), (404, "Unknown model"), (413, "Body too long"),
                         (415, "Body is not JSON"), (429, "All sequences busy"), (503, "Not ready or draining")]
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
    openai = is_openai(request.url.path)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
    field = _field(tuple(first.get("loc", ())))
    kind = first.get("type")
    if kind == "json_invalid":
        return error_response(400, "INVALID_REQUEST", f"malformed JSON: {first.get('msg')}", "body", openai=openai)
    if kind == "missing" and field == "body":
        return error_response(400, "INVALID_REQUEST", "a JSON request body is required", "body", openai=openai)
    if openai and kind == "extra_forbidden":
        return error_response(400, "UNKNOWN_FIELD", f"{field}: unrecognized request argument (not part of the "
                                                    f"API this worker implements)", field, openai=True)
    code = "MISSING_FIELD" if openai and kind == "missing" else "INVALID_REQUEST"
    return error_response(422, code, f"{field}: {first.get('msg')}", field, openai=openai)


def install(app: FastAPI, on_error: Callable[[int], None] = lambda status: None) -> None:
    """JSON error handlers; `on_error(status)` sees every refused request (for metrics)."""

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError) -> JSONResponse:
        on_error(exc.status)
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.retry_after,
                              openai=is_openai(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        response = _validation(request, exc)
        on_error(response.status_code)
        return response

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        field = "body" if exc.status_code == 400 else None  # FastAPI could not read the body
        return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "INVALID_REQUEST"), str(exc.detail),
                              field, openai=is_openai(request.url.path))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "INTERNAL", f"internal error: {type(exc).__name__}",
                              openai=is_openai(request.url.path))
