"""One keep-alive connection of the delivery client: writes a request, reads its answer in bounds.

The answer is read by httptools (llhttp, the parser of Node.js) in an `asyncio.Protocol`. Receivers
are strangers (SPEC §6), so the answer's head (status lines and headers, interim 1xx answers
included) is cut at HEAD_MAX bytes, HEAD_FIELDS_MAX fields and INTERIM_MAX interim answers, counted
as the bytes arrive; a protocol switch (101) is refused; once a final head is in, the outcome is
known, and the body gets BODY_GRACE_S and BODY_READ_MAX bytes at most.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import cast

import httptools

BODY_KEEP = 1024  # bytes of the answer's body kept for the attempt log
BODY_READ_MAX = 64 * 1024  # a longer body is not read to its end: the connection is closed
BODY_GRACE_S = 1.0  # how long a body may take after its head before the attempt ends without it
HEAD_MAX = 64 * 1024  # bytes of answer head, interim answers included
HEAD_FIELDS_MAX = 100  # header fields per head
INTERIM_MAX = 5  # 1xx answers before the final one
TAIL_MAX = BODY_READ_MAX + HEAD_MAX  # raw bytes after the head: body, chunk framing, trailers
HEAD_TOO_LARGE = "response head too large"

PoolKey = tuple[str, str, int]


class ProtocolError(Exception):
    """The destination's answer was not valid HTTP/1.x."""


class ConnectionLostError(ConnectionError):
    """The connection closed before an answer arrived."""

    def __init__(self, before_answer: bool) -> None:
        super().__init__("connection closed before the answer" if before_answer else "reset")
        self.before_answer = before_answer  # not a byte of the answer arrived


@dataclass(slots=True)
class Answer:
    """What a destination answered."""

    status: int
    retry_after: str | None
    body: bytes  # at most BODY_KEEP bytes


class _Abort(Exception):
    """Raised in a parser callback to stop llhttp once the answer is decided."""


class Connection(asyncio.Protocol):
    """One keep-alive connection; at most one exchange at a time."""

    def __init__(self, key: PoolKey, loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        # As lenient as aiohttp's parser is with answers: bare LF line ends, a space before a
        # header's colon or after a chunk size. Receivers like that processed the request.
        self.parser.set_dangerous_leniencies(
            lenient_headers=True,
            lenient_optional_cr_before_lf=True,
            lenient_spaces_after_chunk_size=True,
        )
        self.closed = False
        self.reusable = False
        self.reused = False  # has carried an exchange before this one
        self.idle_since = 0.0  # loop time
        self.idle_for = 0.0  # how long it had been idle when this exchange took it
        self.sent_at = 0.0  # loop time the current request was written
        self._waiter: asyncio.Future[Answer] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._got_bytes = False
        self._headers_done = False  # the final (non-1xx) head is in
        self._head_left = HEAD_MAX  # bytes the answer's head may still take
        self._tail_left = TAIL_MAX  # bytes that may still come in reads after the head's
        self._fields = 0  # header fields of the head being read
        self._interim = 0  # 1xx answers so far
        self._grace = False  # the body's grace timer replaced the deadline
        self._status = 0
        self._retry_after: str | None = None
        self._body = b""
        self._body_read = 0

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            self.close()  # bytes nobody asked for: the connection is in an unknown state
            return
        self._got_bytes = True
        # Nothing may escape from here: an exception in data_received is a "fatal error on
        # transport" that the loop logs with a traceback, and the attempt would end as a reset.
        try:
            if self._headers_done:
                self._tail_left -= len(data)
                if self._tail_left < 0:
                    # Body framing or trailers without end (a trailer bomb): the outcome is in
                    # the head already, and the parser must not see the rest.
                    self._finish()
                    self.close()
                    return
                self.parser.feed_data(data)
            elif len(data) <= self._head_left:
                self.parser.feed_data(data)
                if not self._headers_done:
                    self._head_left -= len(data)
            else:
                self._feed_capped(data)
        except httptools.HttpParserUpgrade:
            self._bad_answer("invalid HTTP answer: the receiver switched protocols")
        except httptools.HttpParserError as exc:
            self._bad_answer(f"invalid HTTP answer: {exc}")
        else:
            if self._headers_done and self._waiter is not None and not self._grace:
                self._await_body()

    def _feed_capped(self, data: bytes) -> None:
        # The parser gets no more than the head's allowance: llhttp has no limit of its own, and
        # httptools grows a header by concatenation, so a header bomb fed whole would cost
        # quadratic time and its whole size in memory.
        left = self._head_left
        view = memoryview(data)
        self.parser.feed_data(view[:left])
        if not self._headers_done:
            self._head_left = 0
            self._bad_answer(HEAD_TOO_LARGE)
            return
        if self._waiter is not None:
            self.parser.feed_data(view[left:])

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        if self._waiter is not None:
            if self._headers_done:
                # An answer without a length ends with the connection, and a body cut short
                # does not change an answer whose head has arrived.
                self._finish()
            else:
                self._fail(ConnectionLostError(before_answer=not self._got_bytes))

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # The start of an answer nobody asked for, in the same read as the last one.
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > HEAD_FIELDS_MAX and not self._headers_done:
            self._refuse(HEAD_TOO_LARGE)
        if len(name) == 11 and name.lower() == b"retry-after":
            self._retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status >= 200:
            self._status = status
            self._headers_done = True
            return
        if status == 101:
            self._refuse("invalid HTTP answer: 101 Switching Protocols (no upgrade was asked for)")
        self._interim += 1  # 1xx: the real answer follows
        if self._interim > INTERIM_MAX:
            self._refuse(HEAD_TOO_LARGE)
        self._fields = 0
        self._retry_after = None

    def on_body(self, body: bytes) -> None:
        if self._waiter is None:
            return
        if len(self._body) < BODY_KEEP:
            self._body += body[: BODY_KEEP - len(self._body)]
        self._body_read += len(body)
        if self._body_read > BODY_READ_MAX:
            # Not worth reading to the end to reuse the connection.
            self._finish()
            self.close()

    def on_message_complete(self) -> None:
        if self._waiter is None or not self._headers_done:
            return  # not ours, or the end of an interim answer
        self.reusable = self.parser.should_keep_alive()
        self._finish()

    # -- one exchange ----------------------------------------------------------------------

    def send(self, data: bytes, deadline: float) -> asyncio.Future[Answer]:
        """Write one request now; the future gets the answer, or TimeoutError at deadline.

        On a connection the peer has already closed nothing is written and the future fails
        at once with ConnectionLostError.
        """
        assert self._waiter is None
        waiter = self._waiter = self.loop.create_future()
        self._got_bytes = self._headers_done = self.reusable = self._grace = False
        self._status, self._retry_after, self._body = 0, None, b""
        self._head_left, self._tail_left = HEAD_MAX, TAIL_MAX
        self._fields = self._interim = self._body_read = 0
        if self.closed or self.transport is None or self.transport.is_closing():
            self._fail(ConnectionLostError(before_answer=True))
            return waiter
        self._deadline = deadline
        self._timer = self.loop.call_at(deadline, self._timed_out)
        self.sent_at = self.loop.time()
        self.transport.write(data)
        return waiter

    def _refuse(self, message: str) -> None:
        """End the exchange for a head we will not read, and stop the parser."""
        self._bad_answer(message)
        raise _Abort(message)

    def _bad_answer(self, message: str) -> None:
        if self._headers_done:
            self._finish()  # the outcome is in the head; what follows does not change it
        else:
            self._fail(ProtocolError(message))
        self.close()

    def _await_body(self) -> None:
        # The final head is in, so the outcome is known: a body that stalls must not hold the
        # attempt (and its destination's slot) until the timeout.
        self._grace = True
        if self._timer is not None:
            self._timer.cancel()
        at = min(self._deadline, self.loop.time() + BODY_GRACE_S)
        self._timer = self.loop.call_at(at, self._body_stalled)

    def _body_stalled(self) -> None:
        self._timer = None
        self._finish()
        self.close()

    def _finish(self) -> None:
        waiter, self._waiter = self._waiter, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if waiter is not None and not waiter.done():
            waiter.set_result(Answer(self._status, self._retry_after, self._body))

    def _fail(self, exc: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        self.reusable = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(TimeoutError())
        self.close()

    def abandon(self) -> None:
        """The exchange's waiter was cancelled: this connection cannot be trusted again."""
        self._fail(asyncio.CancelledError())
        self.close()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
