"""structlog setup: JSON lines when stdout is not a terminal, console otherwise."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


_info_enabled = True


def info_enabled() -> bool:
    """Whether info lines are logged: lets a hot path skip building a line nobody will see
    (structlog's filtering logger still binds a logger per call through the lazy proxy)."""
    return _info_enabled


# aiohttp's server loggers: their records about a bad request carry the raw request bytes.
AIOHTTP_SERVER_LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.internal")


class BadRequestRedactor(logging.Filter):
    """Rewrite aiohttp's records about a request it could not parse or decode.

    aiohttp logs "Error handling request" at error level with the parser's exception, whose text
    quotes the offending header line verbatim, `Authorization: Bearer <token>` included (a NUL
    byte or an obs-fold after a valid token is enough). Such a record becomes one info line naming
    the error class and status and nothing the client sent; the client still gets its 400.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact a record about a malformed request; let every other record through."""
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError | RequestPayloadError):
            return True
        status = exc.code if isinstance(exc, HttpProcessingError) else 400
        record.msg = "http_request_rejected"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.error = type(exc).__name__
        record.status = status
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


_REDACTOR = BadRequestRedactor()


def guard_server_logs() -> None:
    """Install the BadRequestRedactor on aiohttp's server loggers (idempotent).

    A filter on the logger itself runs before any handler sees the record (ours, pytest's caplog,
    an embedding application's), so the raw line is never written anywhere.
    """
    for name in AIOHTTP_SERVER_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACTOR not in logger.filters:
            logger.addFilter(_REDACTOR)


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog and stdlib logging to stdout (or `stream`) at `level` in `fmt`."""
    global _info_enabled
    _info_enabled = _LEVELS[level] <= logging.INFO
    out = sys.stdout if stream is None else stream
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
            # Records of the standard library (uvloop, asyncio, aiohttp) carry exc_info as a
            # tuple: render it as a traceback, as structlog's own lines are.
            foreign_pre_chain=[
                *shared,
                structlog.stdlib.add_logger_name,
                structlog.stdlib.ExtraAdder(allow=("error", "status")),
                structlog.processors.format_exc_info,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(_LEVELS[level], logging.INFO))
    # aiohttp's access log is replaced by our own one line per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    guard_server_logs()
