"""The change feed across processes: changes travel as NOTIFY, arrive through the Listener.

A write that announces a change also sends `pg_notify('pusherd_change', payload)` inside its own
transaction, so other processes only ever hear of committed changes. The payload names the
sending store (`sender`): a process applies its own changes locally at once, after the commit,
and ignores their echo. PostgreSQL folds identical notifications of one transaction into one,
and ingest sends one `pusherd_wake` per group commit, not per row.
"""

from __future__ import annotations

from typing import Any, get_args

import orjson
import structlog

from pusherd.store.changes import Change, ChangeFeed, ChangeKind

log = structlog.get_logger("pusherd.store")

CHANGE_CHANNEL = "pusherd_change"
WAKE_CHANNEL = "pusherd_wake"
_KINDS = frozenset(get_args(ChangeKind))
QUEUED = Change("deliveries_queued")


def payload(sender: str, change: Change) -> str:
    """The NOTIFY payload of a change (small: ids only, far below the 8000-byte limit)."""
    return orjson.dumps(
        {
            "s": sender,
            "k": change.kind,
            "o": change.organization,
            "u": change.subscription,
            "t": change.token,
        }
    ).decode()


def parse(text: str) -> tuple[str, Change] | None:
    """(sender, change) of a payload; None for one this pusherd does not understand."""
    try:
        data: Any = orjson.loads(text)
        kind = data["k"]
        if kind not in _KINDS:
            return None
        return str(data["s"]), Change(kind, str(data["o"]), str(data["u"]), str(data["t"]))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        log.warning("pg_change_unreadable", payload=text[:200])
        return None


class RemoteChanges:
    """Handlers for the Listener: other processes' changes announced on the local feed."""

    def __init__(self, sender: str, feed: ChangeFeed) -> None:
        self.sender = sender
        self.feed = feed
        self._connected_before = False

    def on_change(self, text: str) -> None:
        """A pusherd_change notification."""
        parsed = parse(text)
        if parsed is None or parsed[0] == self.sender:
            return  # our own: announced locally at commit
        self.feed.announce(parsed[1])

    def on_wake(self, text: str) -> None:
        """A pusherd_wake notification: another process queued deliveries."""
        if text != self.sender:
            self.feed.announce(QUEUED)

    def on_connect(self) -> None:
        """(Re)connected: what was sent while the connection was down is lost, so every
        cache is dropped (a change with no ids) and the dispatcher looks for due work. The
        first connection, made while the store opens, has missed nothing."""
        if not self._connected_before:
            self._connected_before = True
            return
        self.feed.announce(Change("subscription_changed"))
        self.feed.announce(QUEUED)
