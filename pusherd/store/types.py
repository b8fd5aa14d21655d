"""The store's neutral types: what every backend takes from and hands to the rest of pusherd."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

import orjson

SubscriptionStatus = Literal["ACTIVE", "FAILING", "DISABLED"]
DeliveryStatus = Literal["pending", "delivered", "failed", "cancelled"]
# What an attempt's outcome does to its delivery.
Finish = Literal["delivered", "retry", "failed", "gone"]
# (event_name, subscription event_names, subscription scopes) -> wanted?
Matcher = Callable[[str, Sequence[str], Sequence[str]], bool]


@dataclass(frozen=True)
class Token:
    id: str
    organization: str
    scopes: tuple[str, ...]
    name: str
    created_ms: int
    expires_ms: int | None
    revoked_ms: int | None

    def status(self, now_ms: int) -> str:
        """active, expired or revoked."""
        if self.revoked_ms is not None:
            return "revoked"
        if self.expires_ms is not None and self.expires_ms <= now_ms:
            return "expired"
        return "active"


@dataclass(frozen=True)
class Subscription:
    uuid: str
    organization: str
    transport: str
    event_names: tuple[str, ...]
    scopes: tuple[str, ...]
    destination: str
    contact_email: str | None
    status: SubscriptionStatus
    signing_key: str = field(repr=False)
    prev_signing_key: str | None = field(repr=False)
    prev_key_until_ms: int | None
    created_ms: int
    updated_ms: int
    failing_since_ms: int | None


@dataclass(frozen=True)
class NewSubscription:
    uuid: str
    organization: str
    transport: str
    event_names: tuple[str, ...]
    scopes: tuple[str, ...]
    destination: str
    contact_email: str | None
    signing_key: str = field(repr=False)


@dataclass(frozen=True)
class SubscriptionChanges:
    """A partial update; None leaves a field as it is."""

    transport: str | None = None
    event_names: tuple[str, ...] | None = None
    scopes: tuple[str, ...] | None = None
    destination: str | None = None
    contact_email: str | None = None
    status: SubscriptionStatus | None = None

    def assignments(self, current_status: str, updated_ms: int) -> list[tuple[str, object]]:
        """The (column, value) pairs of the UPDATE that applies it (None: SQL NULL); lists
        are stored as JSON arrays, and re-activating clears the failing streak."""
        pairs: list[tuple[str, object]] = [
            (column, value)
            for column, value in (
                ("transport", self.transport),
                ("event_names", None if self.event_names is None else _json(self.event_names)),
                ("scopes", None if self.scopes is None else _json(self.scopes)),
                ("destination", self.destination),
                ("contact_email", self.contact_email),
            )
            if value is not None
        ]
        if self.status is not None and self.status != current_status:
            pairs.append(("status", self.status))
            if self.status == "ACTIVE":
                pairs.append(("failing_since_ms", None))
        pairs.append(("updated_ms", updated_ms))
        return pairs


def _json(items: Sequence[str]) -> str:
    return orjson.dumps(list(items)).decode()


class NewEvent(NamedTuple):  # a tuple: ingest builds one per event, and a tuple is built fastest
    organization: str
    event_name: str
    payload: str  # JSON encoding of the payload
    message_id: str | None
    timestamp: str | None  # None: use the ingest time


class IngestResult(NamedTuple):
    message_uuid: str
    message_id: str
    deliveries: int
    duplicate: bool
    delivery_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class StatusChange:
    subscription: str
    organization: str
    contact_email: str | None
    destination: str
    old: SubscriptionStatus
    new: SubscriptionStatus
    reason: str


@dataclass(frozen=True)
class ClaimedDelivery:
    """Everything one attempt needs, read at claim time."""

    id: int
    subscription: str
    attempts: int
    schedule_pos: int
    organization: str
    message_uuid: str
    event_name: str
    message_id: str
    payload: str
    timestamp: str
    destination: str
    # current key first, then a rotated-out one still valid
    signing_keys: tuple[str, ...] = field(repr=False)


@dataclass(frozen=True)
class Claim:
    """What one claim took, and when to look again."""

    deliveries: list[ClaimedDelivery]
    more: bool  # something due may have been left for lack of room in this claim: claim again
    next_due_ms: int | None  # the earliest due time after now of any queue (None: nothing pending)


@dataclass(frozen=True)
class Handover:
    """Room a dispatcher of this process offers to fresh deliveries, as a snapshot.

    An ingest creates a delivery already leased to `owner` (no claim needed) when its origin has
    room here and nothing older of its subscription is due; the others are claimed as usual.
    """

    owner: str
    lease_ms: int
    room: Mapping[str, int]  # origin -> rows it may take now; an origin not named takes none
    skip: frozenset[str] = frozenset()  # subscriptions whose rows must go through a claim


class Taker(Protocol):
    """A dispatcher that takes fresh deliveries straight from ingest."""

    def handover(self) -> Handover | None:
        """The room it offers now (None: nothing); asked inside the ingest's write."""
        ...

    def taken(self, deliveries: list[ClaimedDelivery]) -> None:
        """Deliveries an ingest committed leased to it, in ingest order."""
        ...


@dataclass(frozen=True)
class AttemptRecord:
    started_ms: int
    duration_ms: float
    status_code: int | None
    error: str | None
    response_body: str


@dataclass(frozen=True)
class DeliveryView:
    id: int
    subscription: str
    event_name: str
    status: DeliveryStatus
    attempts: int
    created_ms: int
    finished_ms: int | None
    last_status_code: int | None
    last_error: str | None
    due_ms: int | None
    attempt_log: tuple[AttemptRecord, ...] = field(default=())


@dataclass(frozen=True)
class DeliveryCounts:
    delivered: int
    failed: int
    pending: int

    @property
    def total(self) -> int:
        return self.delivered + self.failed + self.pending


@dataclass(frozen=True)
class QueueStats:
    pending: int
    oldest_pending_age_s: float


@dataclass(frozen=True)
class BackupSummary:
    """What `pusherd backup` reports."""

    path: str
    size_bytes: int
    schema_version: int
    subscriptions: int
    events: int
    deliveries: int
    pending: int
