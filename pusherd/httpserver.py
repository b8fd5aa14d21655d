"""The HTTP server under both listeners: aiohttp's, but a request it cannot parse gets pusherd's
JSON error body (SPEC §4) instead of aiohttp's plain text, which quotes the offending bytes.

When aiohttp's parser rejects a request (a NUL byte or an obs-fold in a header, a bad request
line, an over-long header...), no application code runs: the protocol answers by itself with
`RequestHandler.handle_error`, whose text is the parser's message, i.e. the raw header line,
`Authorization: Bearer <token>` included. This module replaces that answer.

It relies on three aiohttp 3.x internals (checked by tests/test_parse_errors.py):
- `RequestHandler.handle_error(request, status, exc, message)` builds the answer to a parser
  error (and to a crash or timeout that escaped the application), logs it and returns it;
- `Server.__call__` is the protocol factory the sites hand to the event loop, and builds a
  `RequestHandler` from `Server._kwargs`;
- `AppRunner._make_server` runs the app's startup and returns the `Server` for the sites.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    ContentLengthError,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.web_request import BaseRequest

from pusherd.api.errors import error_response

# The C parser (llhttp) raises a plain BadHttpMessage for most errors; its message starts with
# llhttp's fixed reason ("Invalid header value char") and then quotes the request. Only that
# reason is looked at, and only to pick one of these constant phrases: never echoed.
_REASON_KINDS = (
    ("too many headers", "too many headers"),
    ("content-length", "invalid Content-Length"),
    ("transfer-encoding", "invalid Transfer-Encoding or chunked body"),
    ("chunk", "invalid Transfer-Encoding or chunked body"),
    ("header", "invalid header"),
    ("url", "invalid request target"),
    ("method", "invalid method"),
    ("version", "invalid request line"),
    ("start line", "invalid request line"),
    ("http/", "invalid request line"),
)

_CLASS_KINDS: tuple[tuple[type[HttpProcessingError], str], ...] = (
    (LineTooLong, "request line or header too long"),
    (InvalidHeader, "invalid header"),
    (BadHttpMethod, "invalid method"),
    (InvalidURLError, "invalid request target"),
    (BadStatusLine, "invalid request line"),
    (ContentLengthError, "invalid Content-Length"),
    (TransferEncodingError, "invalid Transfer-Encoding or chunked body"),
)


def rejection_message(status: int, exc: BaseException | None) -> str:
    """A message naming the kind of problem with a request, built only from constants."""
    if isinstance(exc, HttpProcessingError):
        for cls, kind in _CLASS_KINDS:
            if isinstance(exc, cls):
                return f"malformed request: {kind}"
        if isinstance(exc, BadHttpMessage):
            reason = exc.message.split(":\n", 1)[0].lower()
            for needle, kind in _REASON_KINDS:
                if needle in reason:
                    return f"malformed request: {kind}"
        return "malformed request"
    if status == HTTPStatus.INTERNAL_SERVER_ERROR:
        return "internal error"
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's protocol, answering what it rejects by itself with the JSON error body."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's handling (logging, the already-sent check), then pusherd's body instead of
        aiohttp's text; the status is aiohttp's and the connection still closes."""
        # The log record goes through pusherd.log.BadRequestRedactor; the text answer is dropped.
        plain = super().handle_error(request, status, exc, message)
        response = error_response(plain.status, rejection_message(plain.status, exc))
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """aiohttp's low-level server, building JsonErrorRequestHandler protocols."""

    def __call__(self) -> web.RequestHandler:
        # As Server.__call__, without its fallback for bad `handler_args`: pusherd passes none.
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class AppRunner(web.AppRunner):
    """web.AppRunner whose server answers parser errors with the JSON error body."""

    async def _make_server(self) -> web.Server:
        # aiohttp's own: runs the app's startup and assembles the protocol's keyword arguments.
        plain = await super()._make_server()
        return JsonErrorServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **plain._kwargs,
        )
