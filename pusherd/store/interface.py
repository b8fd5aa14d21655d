"""The store interface: what pusherd needs from a storage backend, split by who uses it.

Every method is asynchronous (a backend may still answer some from memory). Backends implement
all of `Store`; the rest of pusherd sees only these protocols, the types of `store.types` and the
errors of `store.errors`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

from pusherd.store.changes import ChangeFeed
from pusherd.store.console import ConsoleStore
from pusherd.store.types import (
    AttemptRecord,
    BackupSummary,
    Claim,
    ClaimedDelivery,
    DeliveryCounts,
    DeliveryView,
    Finish,
    IngestResult,
    Matcher,
    NewEvent,
    NewSubscription,
    QueueStats,
    StatusChange,
    Subscription,
    SubscriptionChanges,
    Taker,
    Token,
)


class Tokens(Protocol):
    """API tokens: looked up by the API, managed by the CLI."""

    async def find_token(self, secret: str) -> Token | None:
        """The token with this secret, whatever its state (the caller checks it)."""
        ...

    async def create_token(
        self, organization: str, scopes: tuple[str, ...], name: str, expires_ms: int | None
    ) -> tuple[Token, str]:
        """A new token and its secret (shown once, never stored)."""
        ...

    async def list_tokens(self) -> list[Token]:
        """Every token, oldest first."""
        ...

    async def revoke_token(self, token_id: str) -> bool:
        """Revoke by id; False when there is no such active token."""
        ...


class Subscriptions(Protocol):
    """Subscriptions (Zettle) a.k.a. webhooks (PayStell)."""

    async def create_subscription(
        self, new: NewSubscription, welcome: NewEvent | None
    ) -> Subscription:
        """Insert it (UuidTakenError if taken) and queue `welcome` to it in the same commit."""
        ...

    async def list_subscriptions(self, organization: str) -> list[Subscription]:
        """The organization's live subscriptions, oldest first."""
        ...

    async def get_subscription(self, organization: str, uuid: str) -> Subscription | None:
        """One live subscription of the organization, or None."""
        ...

    async def find_subscription(self, uuid: str) -> Subscription | None:
        """A live subscription of any organization (operator commands), or None."""
        ...

    async def update_subscription(
        self, organization: str, uuid: str, changes: SubscriptionChanges
    ) -> Subscription | None:
        """Apply a partial update; None when there is no such subscription."""
        ...

    async def delete_subscription(self, organization: str, uuid: str) -> bool:
        """Soft-delete it (pending deliveries are closed by close_pending); False if none."""
        ...

    async def rotate_signing_key(
        self, organization: str, uuid: str, new_key: str, keep_old_ms: int
    ) -> bool:
        """Make new_key the signing key; the old one keeps signing for keep_old_ms."""
        ...


class Outbox(Protocol):
    """Ingest: events and their deliveries, committed together."""

    async def ingest(self, events: Sequence[NewEvent], matches: Matcher) -> list[IngestResult]:
        """Store events and a delivery per matching subscription, all or nothing."""
        ...

    async def send_to(self, event: NewEvent, subscriptions: Sequence[str]) -> IngestResult:
        """Store one event addressed to the given subscriptions only (test sends)."""
        ...


class DeliveryQueue(Protocol):
    """The dispatcher's side: claim with a lease, record, hand back."""

    async def due_at(self, blocked: Collection[str] = ()) -> int | None:
        """The earliest next due time of any subscription whose origin is not blocked."""
        ...

    async def may_have_changed(self) -> bool:
        """Whether anything may have been committed, by any process, since the last claim read
        the queues (True when the backend cannot tell). With nothing committed and no due time
        reached, what that claim found still holds: the dispatcher's poll then asks nothing more."""
        ...

    async def claim(
        self,
        owner: str,
        room: Mapping[str, int],
        default_room: int,
        budget: int,
        lease_ms: int,
        default_total: int | None = None,
    ) -> Claim:
        """Lease due deliveries, oldest due first: at most room[origin] per origin (an origin
        not named: default_room, and at most default_total for all of those together), at most
        budget in all, per subscription in ingest order. A row is claimable when pending, due,
        and not leased or its lease has run out."""
        ...

    async def take_fresh(self, taker: Taker | None) -> None:
        """Hand fresh deliveries of this process's ingests straight to taker (see Handover)."""
        ...

    async def origins_in_use(self, origins: Collection[str]) -> set[str]:
        """Those of these origins that some deliverable subscription points at."""
        ...

    async def record_attempt(
        self,
        delivery: ClaimedDelivery,
        owner: str,
        attempt: AttemptRecord,
        finish: Finish,
        next_attempt_ms: int | None,
        disable_after_ms: int,
    ) -> StatusChange | None:
        """Record an attempt; only the lease holder moves the delivery on."""
        ...

    async def disable_overdue(
        self, subscription: str, disable_after_ms: int
    ) -> StatusChange | None:
        """DISABLE a subscription FAILING for disable_after_ms or longer (none of its attempts
        need have failed since: its origin may be paused); the change, or None."""
        ...

    async def release(self, owner: str, ids: Sequence[int]) -> None:
        """Give leased deliveries back without spending an attempt, due at once."""
        ...

    async def recover_leases(self, is_dead: Callable[[str], bool]) -> int:
        """Make rows leased by dead owners due now; how many."""
        ...

    async def subscriptions_to_close(self) -> list[str]:
        """Deleted or DISABLED subscriptions that may still have pending deliveries."""
        ...

    async def close_pending(self, subscription: str, batch: int) -> tuple[str, int]:
        """Finish up to `batch` pending deliveries of a deleted or DISABLED subscription."""
        ...


class Operations(Protocol):
    """The delivery log, replay, counts, retention and backups."""

    async def requeue(self, delivery_id: int, organization: str) -> str:
        """Queue a finished delivery again: "queued", "pending" or "missing"."""
        ...

    async def replay(self, subscription: str, since_ms: int | None, status: str | None) -> int:
        """Re-queue a subscription's finished deliveries; how many."""
        ...

    async def list_deliveries(
        self, subscription: str, status: str | None, limit: int, before_id: int | None
    ) -> list[DeliveryView]:
        """A subscription's deliveries, newest first, keyset-paginated by id."""
        ...

    async def get_delivery(self, delivery_id: int, organization: str) -> DeliveryView | None:
        """One delivery of the organization with every attempt, or None."""
        ...

    async def delivery_counts(self, subscriptions: Sequence[str]) -> DeliveryCounts:
        """delivered / failed / pending totals over these subscriptions."""
        ...

    async def queue_stats(self) -> QueueStats:
        """Pending deliveries and the age of the oldest one."""
        ...

    async def purge(self, cutoff_ms: int, batch: int) -> int:
        """Delete up to `batch` deliveries finished before cutoff and orphaned events."""
        ...

    async def backup(self, dest: str | os.PathLike[str]) -> BackupSummary:
        """A consistent copy to dest (FileExistsError rather than overwrite)."""
        ...


class Store(Tokens, Subscriptions, Outbox, DeliveryQueue, Operations, Protocol):
    """Everything a backend provides, and its change feed."""

    changes: ChangeFeed  # what writes announce (after commit) to the dispatcher and caches

    @property
    def console(self) -> ConsoleStore:
        """The web console's reads and sign-in links (store/console.py)."""
        ...

    async def close(self) -> None:
        """Flush and close."""
        ...
