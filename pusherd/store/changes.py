"""The change feed: what a committed write announces to the dispatcher and the caches.

A write that changes what another part of pusherd must know (a subscription created, changed,
deleted or disabled, a signing key rotated, a token created or revoked, deliveries queued or
re-queued) announces it after its commit, as small data: a kind and the ids concerned — what
another process would need to act on it. On SQLite the feed is in-process; on PostgreSQL the
same changes travel by LISTEN/NOTIFY. Listeners are called synchronously on the event loop and
must only note the change (set an event, drop a cache entry), never block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog

log = structlog.get_logger("pusherd.store")

ChangeKind = Literal[
    "subscription_created",
    "subscription_changed",
    "subscription_deleted",
    "subscription_disabled",
    "key_rotated",
    "token_created",
    "token_revoked",
    "deliveries_queued",
]


@dataclass(frozen=True, slots=True)
class Change:
    """One announcement: its kind and the ids it concerns ("" when not applicable)."""

    kind: ChangeKind
    organization: str = ""
    subscription: str = ""
    token: str = ""


Listener = Callable[[Change], None]


class ChangeFeed:
    """Listeners of a store's changes, called in order after each commit that announces one."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call listener for every change from now on; returns the unsubscribe function."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def announce(self, change: Change) -> None:
        """Tell every listener (a failing listener is logged and does not stop the others)."""
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                log.exception("change_listener_failed", kind=change.kind)
