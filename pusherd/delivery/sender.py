"""One HTTP attempt: build the envelope, sign it, POST it, and describe what happened."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from yarl import URL

from pusherd import __version__
from pusherd.delivery.http import (
    Answer,
    Connection,
    ConnectionLostError,
    HttpClient,
    ProtocolError,
    Target,
    target,
)
from pusherd.delivery.netguard import DestinationError
from pusherd.delivery.retry import Outcome, parse_retry_after
from pusherd.delivery.signing import signature_headers
from pusherd.store.types import ClaimedDelivery

USER_AGENT = f"pusherd/{__version__}"


def envelope(d: ClaimedDelivery) -> bytes:
    """The JSON body of SPEC §6; `payload` stays the JSON-encoded string."""
    return orjson.dumps(
        {
            "organizationUuid": d.organization,
            "messageUuid": d.message_uuid,
            "eventName": d.event_name,
            "messageId": d.message_id,
            "payload": d.payload,
            "timestamp": d.timestamp,
        }
    )


def answer_text(body: bytes) -> str:
    """The kept start of an answer as text: undecodable bytes and NUL (which PostgreSQL text
    cannot hold; one failed the whole group of records it was in) become U+FFFD."""
    return body.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def origin_of(url: str) -> str:
    """scheme://host:port, the unit of per-destination limits and circuit breaking."""
    u = URL(url)
    return f"{u.scheme}://{u.host}:{u.port}"


def outcome_label(outcome: Outcome) -> str:
    """The `outcome` label of pusherd_delivery_attempts_total."""
    if outcome.status_code is not None:
        return "success" if outcome.ok else "http_error"
    return "timeout" if outcome.error and outcome.error.startswith("timeout") else "network_error"


@dataclass(slots=True)
class Exchange:
    """A request already written on a pooled connection, waiting for its answer."""

    target: Target
    request: bytes
    conn: Connection
    answer: asyncio.Future[Answer]
    started: float  # perf_counter
    deadline: float  # loop time


class Sender:
    """Sends one signed attempt; never raises for an HTTP or network failure.

    `start` writes the request at once when the destination has an idle connection, so the
    caller decides the order requests leave in; `finish` waits for the answer (opening a
    connection first when there was none).
    """

    def __init__(self, client: HttpClient, timeout_s: float) -> None:
        self.client = client
        self.timeout_s = timeout_s

    def request(self, t: Target, d: ClaimedDelivery) -> bytes:
        """The whole request: fixed head, length and signature headers, envelope."""
        body = envelope(d)
        signatures = signature_headers(
            keys=d.signing_keys,
            msg_id=d.message_uuid,
            ts_s=int(time.time()),
            timestamp=d.timestamp,
            payload=d.payload,
            body=body,
        )
        lines = "".join(f"{name}: {value}\r\n" for name, value in signatures.items())
        return b"".join((t.head, f"Content-Length: {len(body)}\r\n{lines}\r\n".encode(), body))

    def start(self, d: ClaimedDelivery) -> Exchange | None:
        """Write d's request now if its origin has an idle connection, else None."""
        try:
            t = target(d.destination, USER_AGENT)
        except ValueError:
            return None  # finish() reports it
        conn = self.client.idle(t)
        if conn is None:
            return None
        started = time.perf_counter()
        deadline = conn.loop.time() + self.timeout_s
        try:
            request = self.request(t, d)
        except Exception:
            conn.close()
            return None  # finish() runs the attempt again and reports what went wrong
        return Exchange(t, request, conn, conn.send(request, deadline), started, deadline)

    async def send(self, d: ClaimedDelivery, on_sent: Callable[[], None] | None = None) -> Outcome:
        """POST the delivery once and return its Outcome."""
        return await self.finish(d, self.start(d), on_sent)

    async def finish(
        self, d: ClaimedDelivery, ex: Exchange | None, on_sent: Callable[[], None] | None = None
    ) -> Outcome:
        """Wait for the answer of a started exchange, or run the whole attempt when ex is None;
        on_sent fires once the request is written (on a new connection to an origin that keeps
        connections alive: once it is answered, so that the next requests cannot overtake it)."""
        loop = asyncio.get_running_loop()
        started = ex.started if ex else time.perf_counter()
        deadline = ex.deadline if ex else loop.time() + self.timeout_s
        conn = ex.conn if ex else None
        hold: asyncio.TimerHandle | None = None
        try:
            if ex is None:
                t = target(d.destination, USER_AGENT)
                conn = current = await self._open(t, deadline)
                request = self.request(t, d)
                waiter = current.send(request, deadline)
                # A receiver takes up a new connection (accept, then read) after the requests
                # already waiting on its open ones: the origin's next requests, written on
                # those, would overtake this one. They wait for its answer instead (SPEC §5:
                # events reach a subscriber in ingest order). A receiver that closes after
                # every answer has no open ones: its next requests queue behind this one's
                # connection in its accept backlog, in order. A receiver that takes its time
                # to answer has read the request long before: the hold ends after
                # NEW_CONNECTION_HOLD_S all the same, so that it does not cut the origin's
                # concurrency to one attempt until an answer or the timeout.
                if on_sent is not None and self.client.keeps_alive(t.key):
                    hold = loop.call_later(NEW_CONNECTION_HOLD_S, on_sent)
                    on_sent = None  # the caller's on_sent after the answer releases them
            else:
                t, request, waiter, current = ex.target, ex.request, ex.answer, ex.conn
            if on_sent is not None:
                on_sent()
            try:
                answer = await waiter
            except ConnectionLostError as exc:
                if not (exc.before_answer and lost_to_idle_close(current, loop.time())):
                    raise
                # The receiver closed the idle keep-alive connection as the request went into
                # it, so it never saw the request: send it once more on a new connection.
                conn = current = await self._open(t, deadline)
                answer = await current.send(request, deadline)
            self.client.release(current)
            retry_after = None
            if answer.status in (429, 503):
                retry_after = parse_retry_after(answer.retry_after, time.time())
            return Outcome(
                status_code=answer.status,
                error=None,
                duration_ms=(time.perf_counter() - started) * 1000,
                body=answer_text(answer.body),
                retry_after_s=retry_after,
            )
        except asyncio.CancelledError:
            if conn is not None:
                conn.abandon()
            raise
        except TimeoutError:
            error = f"timeout after {self.timeout_s:g}s"
        except (DestinationError, ProtocolError, ConnectionLostError) as exc:
            error = str(exc)
        except ssl.SSLError as exc:
            error = f"TLS error: {exc}"[:500]
        except (OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            if hold is not None:
                hold.cancel()
        if conn is not None:
            conn.close()
        return Outcome(
            status_code=None,
            error=error,
            duration_ms=(time.perf_counter() - started) * 1000,
            body="",
            retry_after_s=None,
        )

    async def _open(self, t: Target, deadline: float) -> Connection:
        async with asyncio.timeout_at(deadline):
            return await self.client.connect(t, deadline - asyncio.get_running_loop().time())


# A request on a new connection to a keep-alive receiver holds the origin's next requests
# until answered, or this long at most (a receiver accepts and reads a new connection within
# milliseconds; one that hangs must not hold the others for its whole timeout).
NEW_CONNECTION_HOLD_S = 0.5
IDLE_CLOSE_MIN_S = 0.5  # idle at least this long before reuse: a server's idle timeout may hit it
RACE_WINDOW_S = 0.05  # lost this soon after the write: the close was already on its way


def lost_to_idle_close(conn: Connection, now: float) -> bool:
    """Whether a connection lost without a byte of answer was most likely closed by the
    receiver's keep-alive timeout as the request went in (so the request was never read).

    A receiver that read the request and then died without answering looks the same from
    here; the two bounds keep the retry to the race, where that is least likely. A request
    sent twice carries the same webhook-id either way.
    """
    return conn.reused and conn.idle_for >= IDLE_CLOSE_MIN_S and now - conn.sent_at < RACE_WINDOW_S
