"""The one JSON error body, `{"status": "error", "message": ...}`, for every pusherd error."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from pusherd.log import info_enabled
from pusherd.store.db import StoreError

log = structlog.get_logger("pusherd.http")

JSON = "application/json"


class ApiError(Exception):
    """An error answer with a status code and a message."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON response encoded with orjson."""
    return web.Response(body=orjson.dumps(data), status=status, content_type=JSON, headers=headers)


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The error body every pusherd error uses."""
    return json_response({"status": "error", "message": message}, status, headers)


_REASONS = {
    404: "not found",
    405: "method not allowed",
    413: "request body too large",
}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into the JSON error body, and log one line per request."""
    start = time.perf_counter()
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = _REASONS.get(exc.status) or exc.reason.lower()
        headers = {
            k: v
            for k, v in exc.headers.items()
            if k.lower() in {"allow", "retry-after"} or k.lower().startswith("x-ratelimit-")
        }
        response = error_response(exc.status, message, headers)
    except StoreError as exc:
        log.error("store_unavailable", error=str(exc))
        response = error_response(503, "storage is unavailable, try again", {"Retry-After": "1"})
    except Exception:
        log.exception("request_crashed", method=request.method, path=request.path)
        response = error_response(500, "internal error")
    if info_enabled():
        log.info(
            "request_handled",
            method=request.method,
            path=request.path,
            status=response.status,
            duration_ms=round((time.perf_counter() - start) * 1000, 2),
        )
    return response


# What aiohttp's parser decodes (it passes any other coding through undecoded, as if identity).
CONTENT_CODINGS = frozenset({"identity", "gzip", "deflate", "br", "zstd"})


async def read_body(request: web.Request) -> bytes:
    """The request body, decoded per its Content-Encoding; 400 when that does not decode (an
    unknown coding, bad gzip or deflate data, a broken chunked framing): never a 500."""
    coding = request.headers.get("Content-Encoding", "").strip()
    if coding and coding.lower() not in CONTENT_CODINGS:
        shown = coding[:40] if coding.isascii() and coding.isprintable() else "(not ASCII)"
        raise ApiError(400, f"unsupported Content-Encoding: {shown}")
    try:
        return await request.read()
    except (web.RequestPayloadError, HttpProcessingError):
        # The rest of the body cannot be read either, so the connection cannot carry another
        # request: aiohttp closes it after this answer, and the client is told so.
        raise ApiError(
            400,
            "request body cannot be read (bad Content-Encoding or framing)",
            {"Connection": "close"},
        ) from None


async def read_json(request: web.Request, *, empty_ok: bool = True) -> Any:
    """The parsed JSON body; an absent or empty body is {} when empty_ok; 400 when not JSON."""
    raw = await read_body(request)
    if not raw.strip():
        if empty_ok:
            return {}
        raise ApiError(400, "request body is empty")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "request body is not valid JSON") from None
