"""Request bodies read as strict JSON (RFC 8259): application/json, UTF-8, unique keys, numbers Python can
hold, nesting within the parser's recursion limit, no lone UTF-16 surrogates. Anything else is a 4xx
naming where it went wrong, before a model ever sees it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from email.message import Message
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from worker_orcd.server.errors import APIError

_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise DuplicateKey(k)
            seen.add(k)
    return out


def _invalid(message: str, field: str = "body") -> APIError:
    return APIError(400, "INVALID_REQUEST", message, field)


def parse_json(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")  # strict: json.loads would also take UTF-16/32 and encoded surrogates
    except UnicodeDecodeError as e:
        raise _invalid(f"body: not UTF-8 text (byte {e.start}: {body[e.start:e.start + 1]!r}, {e.reason})") from None
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise _invalid(f"body: malformed JSON: {e}") from None
    except DuplicateKey as e:
        raise _invalid(f"body: the key {str(e)[:100]!r} appears twice in one JSON object") from None
    except RecursionError:
        raise _invalid("body: JSON nested too deeply") from None
    except ValueError as e:  # an integer longer than sys.get_int_max_str_digits()
        raise _invalid(f"body: a JSON number is too long ({str(e).split(':')[0]})") from None
    if _ESCAPED_SURROGATE.search(text):
        where = _lone_surrogate(value)
        if where is not None:
            raise _invalid(f"{where}: holds a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair), "
                           f"which is not Unicode text", where)
    return value


def _lone_surrogate(value: Any) -> str | None:
    """The path ('messages[0].content') of the first string, or key, holding a lone surrogate."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return path or "body"
        elif isinstance(v, dict):
            for k, item in v.items():
                key_path = f"{path}.{k}" if path else k
                if _SURROGATE.search(k):
                    return path or "body"
                stack.append((key_path, item))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(v))
    return None


def _check_content_type(value: str | None) -> None:
    if value is None:
        raise APIError(415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type: missing; send the body as application/json",
                       "Content-Type")
    m = Message()
    m["content-type"] = value
    subtype, charset = m.get_content_subtype(), (m.get_param("charset") or "utf-8")
    if m.get_content_maintype() != "application" or not (subtype == "json" or subtype.endswith("+json")):
        raise APIError(415, "UNSUPPORTED_MEDIA_TYPE", f"Content-Type: {value[:100]!r} is not JSON; send the body "
                                                      f"as application/json", "Content-Type")
    if str(charset).lower().replace("-", "") != "utf8":
        raise APIError(415, "UNSUPPORTED_MEDIA_TYPE", f"Content-Type: charset {str(charset)[:40]!r}; JSON is UTF-8",
                       "Content-Type")


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is checked by `parse_json`; a non-empty body must say it is JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def strict(request: Request) -> Response:
            request = StrictJSONRequest(request.scope, request.receive)
            if await request.body():  # an empty body is FastAPI's "body required"
                _check_content_type(request.headers.get("content-type"))
            return await handler(request)

        return strict
