"""One HTTP attempt: build the envelope, sign it, POST it, and describe what happened."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from types import SimpleNamespace

import aiohttp
import orjson
from yarl import URL

from pusherd import __version__
from pusherd.delivery.netguard import DestinationError, GuardedResolver, check_connect_host
from pusherd.delivery.retry import Outcome, parse_retry_after
from pusherd.delivery.signing import signature_headers
from pusherd.store.models import ClaimedDelivery

USER_AGENT = f"pusherd/{__version__}"
BODY_KEEP = 1024


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


def origin_of(url: str) -> str:
    """scheme://host:port, the unit of per-destination limits and circuit breaking."""
    u = URL(url)
    return f"{u.scheme}://{u.host}:{u.port}"


def outcome_label(outcome: Outcome) -> str:
    """The `outcome` label of pusherd_delivery_attempts_total."""
    if outcome.status_code is not None:
        return "success" if outcome.ok else "http_error"
    return "timeout" if outcome.error and outcome.error.startswith("timeout") else "network_error"


async def _headers_sent(
    session: aiohttp.ClientSession,
    ctx: SimpleNamespace,
    params: aiohttp.TraceRequestHeadersSentParams,
) -> None:
    on_sent = ctx.trace_request_ctx
    if callable(on_sent):
        on_sent()


def make_session(max_in_flight: int, allow_private: bool) -> aiohttp.ClientSession:
    """The one ClientSession: connects only to vetted addresses, never follows redirects."""
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_headers_sent)
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(allow_private=allow_private),
        limit=max_in_flight,
        limit_per_host=0,
        ttl_dns_cache=10,
        family=socket.AF_UNSPEC,
    )
    return aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": USER_AGENT},
        auto_decompress=True,
        cookie_jar=aiohttp.DummyCookieJar(),
        trace_configs=[trace],
    )


class Sender:
    """Sends one signed attempt; never raises for an HTTP or network failure."""

    def __init__(
        self, session: aiohttp.ClientSession, timeout_s: float, allow_private: bool
    ) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.timeout_s = timeout_s
        self.allow_private = allow_private

    async def send(self, d: ClaimedDelivery, on_sent: Callable[[], None] | None = None) -> Outcome:
        """POST the delivery once and return its Outcome; on_sent fires once the request is out."""
        body = envelope(d)
        headers = {
            "Content-Type": "application/json",
            **signature_headers(
                keys=d.signing_keys,
                msg_id=d.message_uuid,
                ts_s=int(time.time()),
                timestamp=d.timestamp,
                payload=d.payload,
                body=body,
            ),
        }
        start = time.perf_counter()
        try:
            check_connect_host(URL(d.destination).raw_host or "", self.allow_private)
            async with self.session.post(
                d.destination,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=self.timeout,
                trace_request_ctx=on_sent,
            ) as resp:
                raw = b""
                while len(raw) < BODY_KEEP:  # read() returns what is buffered: loop for 1 KiB
                    chunk = await resp.content.read(BODY_KEEP - len(raw))
                    if not chunk:
                        break
                    raw += chunk
                if not resp.content.at_eof():
                    resp.close()  # a large answer is not worth reading to keep the connection
                retry_after = None
                if resp.status in (429, 503):
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
                return Outcome(
                    status_code=resp.status,
                    error=None,
                    duration_ms=(time.perf_counter() - start) * 1000,
                    body=raw.decode("utf-8", errors="replace"),
                    retry_after_s=retry_after,
                )
        except TimeoutError:
            error = f"timeout after {self.timeout_s:g}s"
        except DestinationError as exc:
            error = str(exc)
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        except (OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        except asyncio.CancelledError:
            raise
        return Outcome(
            status_code=None,
            error=error,
            duration_ms=(time.perf_counter() - start) * 1000,
            body="",
            retry_after_s=None,
        )
