"""A delivery as it went out: the envelope, the payload pretty-printed, the headers sent.

The headers are rebuilt with the delivery code's own functions (envelope, request head,
signatures) for the time of the last attempt, so they are what the receiver got, except that a
signing key rotated since then signs differently. The key itself never leaves this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import orjson

from pusherd.delivery.http import target
from pusherd.delivery.sender import USER_AGENT, envelope
from pusherd.delivery.signing import signature_headers
from pusherd.store.console import DeliveryDetail
from pusherd.store.types import ClaimedDelivery


@dataclass(frozen=True)
class Sent:
    request_line: str
    headers: tuple[tuple[str, str], ...]
    body: str  # the envelope exactly as sent
    payload_pretty: str  # the payload string decoded and indented (or as is, if not JSON)
    signed_at_s: int


def _claimed(d: DeliveryDetail) -> ClaimedDelivery:
    return ClaimedDelivery(
        id=d.row.id,
        subscription=d.subscription,
        attempts=d.row.attempts,
        schedule_pos=0,
        organization=d.organization,
        message_uuid=d.message_uuid,
        event_name=d.row.event_name,
        message_id=d.message_id,
        payload=d.payload,
        timestamp=d.timestamp,
        destination=d.destination,
        signing_keys=d.signing_keys,
    )


def pretty(payload: str) -> str:
    """The JSON text indented by two spaces; anything that is not JSON is shown as it is."""
    try:
        return orjson.dumps(orjson.loads(payload), option=orjson.OPT_INDENT_2).decode()
    except orjson.JSONDecodeError:
        return payload


def sent(d: DeliveryDetail) -> Sent:
    """What the last attempt sent (or the next one will, when there was none)."""
    claimed = _claimed(d)
    body = envelope(claimed)
    ts_s = d.attempt_log[-1].started_ms // 1000 if d.attempt_log else int(time.time())
    signatures = signature_headers(
        keys=d.signing_keys,
        msg_id=d.message_uuid,
        ts_s=ts_s,
        timestamp=d.timestamp,
        payload=d.payload,
        body=body,
    )
    try:
        head = target(d.destination, USER_AGENT).head.decode("ascii", errors="replace")
    except ValueError:
        head = f"POST {d.destination} HTTP/1.1\r\n"
    first, *lines = [line for line in head.split("\r\n") if line]
    headers = [tuple(line.split(": ", 1)) for line in lines if ": " in line]
    headers.append(("Content-Length", str(len(body))))
    headers.extend(signatures.items())
    return Sent(
        request_line=first,
        headers=tuple((str(k), str(v)) for k, v in headers),
        body=body.decode(),
        payload_pretty=pretty(d.payload),
        signed_at_s=ts_s,
    )
