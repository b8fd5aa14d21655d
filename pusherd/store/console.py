"""What the console (SPEC §9) asks of the store: neutral types and the Protocol (`Store.console`).

`organization=None` means every organization (an ADMIN's view); otherwise one organization's rows
only. Every query is bounded by an index range or a row cap, so a page view costs the same at a
million deliveries as at a thousand.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pusherd.store.types import AttemptRecord, Subscription, Token

# A log page looks at most this many of a subscription's deliveries; the page then offers to
# search further back ("older") from where it stopped.
LOG_SCAN_ROWS = 5000
# Latency percentiles are taken over at most this many of the newest attempts of the window.
LATENCY_SAMPLE = 5000
# A token keeps at most this many sessions: a new sign-in ends its least recently used one
# beyond (a script signing in over and over cannot fill the table).
SESSIONS_PER_TOKEN = 100
# Sign-in link secrets start with this (recognisable in logs and secret scanners).
LINK_PREFIX = "pcl_"


@dataclass(frozen=True)
class MinuteCount:
    minute_ms: int  # start of the bucket (unix ms, a multiple of the bucket length)
    delivered: int
    failed: int


@dataclass(frozen=True)
class BucketCount:
    bucket_ms: int  # start of the bucket
    subscription: str
    delivered: int
    failed: int


@dataclass(frozen=True)
class Latency:
    attempts: int  # how many attempts the percentiles were taken over
    p50_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class Queue:
    pending: int
    oldest_pending_age_s: float


@dataclass(frozen=True)
class SubscriptionCounts:
    delivered: int = 0
    failed: int = 0

    @property
    def success_rate(self) -> float | None:
        """delivered / (delivered + failed) x 100, or None when nothing finished."""
        done = self.delivered + self.failed
        return None if done == 0 else round(self.delivered / done * 100, 2)


@dataclass(frozen=True)
class LogFilter:
    status: str | None = None  # pending | delivered | failed
    event_name: str | None = None
    since_ms: int | None = None  # created at or after
    until_ms: int | None = None  # created at or before
    before_id: int | None = None  # paging: only ids below this


@dataclass(frozen=True)
class LogRow:
    id: int
    event_name: str
    status: str
    attempts: int
    created_ms: int
    finished_ms: int | None
    last_status_code: int | None
    last_error: str | None
    due_ms: int | None


@dataclass(frozen=True)
class LogPage:
    rows: tuple[LogRow, ...]
    # where the next (older) page starts, None on the last page
    next_before_id: int | None


@dataclass(frozen=True)
class DeliveryDetail:
    """One delivery with its event, its subscription and every attempt."""

    row: LogRow
    subscription: str
    organization: str
    destination: str
    message_uuid: str
    message_id: str
    payload: str
    timestamp: str
    signing_keys: tuple[str, ...] = field(repr=False)  # only to rebuild signatures; never shown
    attempt_log: tuple[AttemptRecord, ...] = ()


@dataclass(frozen=True)
class LinkState:
    organization: str
    expires_ms: int
    used_ms: int | None


@dataclass(frozen=True)
class SessionRecord:
    """A console session as stored: who signed in, and until when (the cookie's id is not here)."""

    organization: str | None  # None: an ADMIN, every organization
    home: str  # the organization the rate limit counts against
    label: str
    token_id: str | None  # the API token it was made from (None: a console-link)
    csrf: str
    created_ms: int
    last_seen_ms: int
    expires_ms: int  # last_seen_ms + the idle expiry
    flash: tuple[str, ...] = ()  # messages waiting for the next page, whichever process shows it


class ConsoleStore(Protocol):
    """The console's reads, its one-time sign-in links and its sessions.

    Session methods take the cookie's id and store only `session_hash` of it; `create_session`
    ends the token's least recently seen sessions beyond SESSIONS_PER_TOKEN. `session` answers
    a session whose expiry is after now_ms; `take_flash` empties the messages it returns in one
    step, so two processes never show the same message twice.
    """

    async def token_by_id(self, token_id: str) -> Token | None: ...
    async def subscriptions(self, organization: str | None) -> list[Subscription]: ...
    async def subscription(self, organization: str | None, uuid: str) -> Subscription | None: ...
    async def latency(self, organization: str | None, since_ms: int) -> Latency: ...
    async def queue(self, organization: str | None) -> Queue: ...
    async def finished_counts(
        self, since_ms: int, until_ms: int, bucket_ms: int
    ) -> list[BucketCount]: ...
    async def log_page(self, subscription: str, flt: LogFilter, limit: int) -> LogPage: ...
    async def delivery(
        self, organization: str | None, delivery_id: int
    ) -> DeliveryDetail | None: ...
    async def create_link(self, organization: str, expires_ms: int) -> str: ...
    async def link_state(self, secret: str) -> LinkState | None: ...
    async def redeem_link(self, secret: str) -> str | None: ...
    async def create_session(self, sid: str, record: SessionRecord) -> None: ...
    async def session(self, sid: str, now_ms: int) -> SessionRecord | None: ...
    async def touch_session(self, sid: str, now_ms: int, expires_ms: int) -> None: ...
    async def end_session(self, sid: str) -> bool: ...
    async def add_flash(self, sid: str, messages: Sequence[str]) -> None: ...
    async def take_flash(self, sid: str) -> list[str]: ...
    async def purge_sessions(self, now_ms: int) -> int: ...


def new_link_secret() -> str:
    """A fresh sign-in link secret."""
    return LINK_PREFIX + secrets.token_urlsafe(32)


def link_hash(secret: str) -> str:
    """What a backend stores of a sign-in link: sha256 hex of its secret, never the secret."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def session_hash(sid: str) -> str:
    """What a backend stores of a session's cookie id: sha256 hex, never the id itself (a
    read of the table, a backup or a log of its rows signs nobody in)."""
    return hashlib.sha256(b"pusherd-console-session:" + sid.encode("utf-8")).hexdigest()


def flash_json(messages: Sequence[str]) -> str:
    """Flash messages as a backend stores them (a JSON list)."""
    return json.dumps(list(messages))


def flash_of(text: str | None) -> tuple[str, ...]:
    """Stored flash messages back as a tuple (anything but a list of strings reads as none)."""
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return ()
    if not isinstance(value, list):
        return ()
    return tuple(m for m in value if isinstance(m, str))


def latency_of(durations: Iterable[float]) -> Latency:
    """p50/p99 (nearest rank) of attempt durations in ms; both None when there are none."""
    values = sorted(float(v) for v in durations)
    if not values:
        return Latency(0, None, None)

    def pct(p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))]

    return Latency(len(values), pct(0.50), pct(0.99))


async def first_id_at(
    ends: tuple[int | None, int | None],
    probe: Callable[[int], Awaitable[tuple[int, int] | None]],
    ms: int,
) -> int:
    """The smallest id whose time is >= ms, for a table whose ids grow with time: a binary
    search of about 20 primary-key probes instead of an index on the time.

    `ends` are the table's smallest and largest ids (None: empty); `probe(mid)` gives the
    nearest existing row at or after mid as (id, time), or None (retention leaves holes).
    """
    lo_id, hi_id = ends
    if lo_id is None or hi_id is None:
        return 1
    lo, hi = int(lo_id), int(hi_id) + 1  # answer in [lo, hi]; hi: no row is that recent
    while lo < hi:
        mid = (lo + hi) // 2
        found = await probe(mid)
        if found is None or found[1] >= ms:
            hi = mid
        else:
            lo = found[0] + 1
    return lo


# The columns of console_sessions after its hash, in the order session_record reads them.
SESSION_COLUMNS = (
    "organization, home, label, token_id, csrf, created_ms, last_seen_ms, expires_ms, flash"
)


def session_record(r: Any) -> SessionRecord:
    """A session row (SESSION_COLUMNS, in order) as a SessionRecord, on either backend."""
    return SessionRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], flash_of(r[8]))
