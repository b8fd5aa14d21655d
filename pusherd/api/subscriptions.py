"""Validation and actions shared by both dialects: one model, two thin route modules.

Errors are raised as FieldError (bad input for a named field) or ScopeError; each dialect maps them
to its own status codes (Zettle: 422 for destination/contactEmail, 400 otherwise; PayStell: 400).
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import string
import uuid as uuidlib
from collections.abc import Sequence

import orjson

from pusherd.catalogue import TEST_MESSAGE, Catalogue
from pusherd.config import DeliveryConfig
from pusherd.delivery.netguard import DestinationError, vet_destination
from pusherd.runtime import Runtime
from pusherd.store.types import (
    NewEvent,
    NewSubscription,
    Subscription,
    SubscriptionChanges,
    Token,
)

KEY_ALPHABET = string.ascii_letters + string.digits
# No control characters in the local part (RFC 5322 atext; PostgreSQL text cannot hold NUL).
_EMAIL_RE = re.compile(
    r"^[^@\s\x00-\x1f\x7f\"(),:;<>\[\]\\]+"
    r"@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\.[A-Za-z0-9-]{2,}$"
)
EMAIL_MAX = 512
DESTINATION_MAX = 2048
# Spaces and control characters are not allowed anywhere in a URL (RFC 3986). The URL parser
# would not refuse them: it drops tabs and line breaks and percent-encodes the rest, so the
# receiver would be sent to another path than the one stored and shown.
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")
WELCOME_PAYLOAD = orjson.dumps({"data": "payload"}).decode()
TEST_PAYLOAD = orjson.dumps({"test": True}).decode()


class FieldError(Exception):
    """Bad input for one field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class ScopeError(Exception):
    """The token lacks a scope an event needs."""


class Refused(Exception):
    """An action the state of a webhook or delivery does not allow: 404 or 409."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


ROTATION_OVERLAP_MS = 24 * 3600 * 1000
DISABLED_MESSAGE = "this webhook is not active; set isActive to true first"


def new_signing_key() -> str:
    """64 random alphanumeric characters."""
    # One read of the system's random source, not one per character: bytes below 248 (4 x 62)
    # map uniformly onto the alphabet; the others are dropped.
    out = ""
    while len(out) < 64:
        out += "".join(KEY_ALPHABET[b % 62] for b in secrets.token_bytes(80) if b < 248)
    return out[:64]


def parse_uuid(value: object, field: str = "uuid") -> str:
    """A canonical lowercase UUID string, or FieldError."""
    if not isinstance(value, str):
        raise FieldError(field, f"{field} must be a UUID string")
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        raise FieldError(field, f"{field} is not a valid UUID") from None


def parse_event_names(
    value: object, catalogue: Catalogue, field: str = "eventNames"
) -> tuple[str, ...]:
    """A list of known event names (duplicates dropped, order kept)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FieldError(field, f"{field} must be an array of event names")
    unknown = [v for v in value if v not in catalogue]
    if unknown:
        raise FieldError(field, f"unknown event name: {unknown[0]}")
    return tuple(dict.fromkeys(value))


def check_scopes(names: Sequence[str], token: Token, catalogue: Catalogue) -> None:
    """ScopeError unless the token may subscribe to every named event."""
    for name in names:
        if not catalogue.allowed(name, token.scopes):
            raise ScopeError(f"token lacks scope {catalogue.scope_of(name)} needed for {name}")


def parse_email(value: object, field: str = "contactEmail") -> str:
    """A plausible e-mail address of at most 512 characters."""
    if not isinstance(value, str) or not value:
        raise FieldError(field, f"{field} must be a non-empty string")
    if len(value) > EMAIL_MAX:
        raise FieldError(field, f"{field} must not exceed {EMAIL_MAX} characters")
    if not _EMAIL_RE.match(value):
        raise FieldError(field, f"{field} is not a valid e-mail address")
    return value


async def parse_destination(
    value: object, config: DeliveryConfig, field: str = "destination"
) -> str:
    """An absolute https URL (http with allow_http) of at most 2,048 characters, not on a blocked
    network."""
    if not isinstance(value, str) or not value.strip():
        raise FieldError(field, f"{field} must be a non-empty URL")
    if len(value) > DESTINATION_MAX:
        # Checked before anything parses or resolves it, and before a cache keyed by destination
        # could hold on to it.
        raise FieldError(field, f"{field} must not exceed {DESTINATION_MAX} characters")
    if _URL_FORBIDDEN.search(value):
        raise FieldError(field, f"{field} must not contain spaces or control characters")
    try:
        await vet_destination(
            value,
            allow_http=config.allow_http,
            allow_private=config.allow_private_destinations,
        )
    except DestinationError as exc:
        raise FieldError(field, str(exc)) from None
    return value


def welcome_event(
    organization: str, event_name: str = TEST_MESSAGE, payload: str = WELCOME_PAYLOAD
) -> NewEvent:
    """The TestMessage queued to a new subscription (or a PayStell test send)."""
    return NewEvent(organization, event_name, payload, None, None)


async def create(
    runtime: Runtime,
    token: Token,
    *,
    sub_uuid: str,
    event_names: tuple[str, ...],
    destination: str,
    contact_email: str | None,
    signing_key: str | None = None,
) -> Subscription:
    """Store a new ACTIVE subscription and queue its TestMessage (UuidTakenError if taken)."""
    new = NewSubscription(
        uuid=sub_uuid,
        organization=token.organization,
        transport="WEBHOOK",
        event_names=event_names,
        scopes=token.scopes,
        destination=destination,
        contact_email=contact_email,
        signing_key=signing_key or new_signing_key(),
    )
    return await runtime.store.create_subscription(new, welcome_event(token.organization))


async def update(
    runtime: Runtime, token: Token, sub_uuid: str, changes: SubscriptionChanges
) -> Subscription | None:
    """Apply a partial update, recording the updating token's scopes (for eventNames: [])."""
    changes = dataclasses.replace(changes, scopes=token.scopes)
    return await apply_changes(runtime, token.organization, sub_uuid, changes)


async def apply_changes(
    runtime: Runtime, organization: str, sub_uuid: str, changes: SubscriptionChanges
) -> Subscription | None:
    """Store a partial update (the console's re-enable comes here too).

    The store announces the change: the dispatcher and the closing of pending rows follow it.
    """
    return await runtime.store.update_subscription(organization, sub_uuid, changes)


async def delete(runtime: Runtime, organization: str, sub_uuid: str) -> bool:
    """Delete a subscription and cancel its pending deliveries, also those already claimed."""
    # The store announces the deletion; the runtime closes the pending rows when it hears it.
    return await runtime.store.delete_subscription(organization, sub_uuid)


async def retry_delivery(runtime: Runtime, organization: str, delivery_id: int) -> None:
    """Queue a finished delivery again (a replay when it was delivered); Refused otherwise."""
    d = await runtime.store.get_delivery(delivery_id, organization)
    if d is None:
        raise Refused(404, "no such event")
    sub = await runtime.store.get_subscription(organization, d.subscription)
    if sub is not None and sub.status == "DISABLED":
        raise Refused(409, DISABLED_MESSAGE)
    # requeue announces deliveries_queued: the dispatcher wakes on the change feed.
    outcome = await runtime.store.requeue(delivery_id, organization)
    if outcome == "missing":
        raise Refused(404, "no such event")
    if outcome == "pending":
        raise Refused(409, "this event is still pending; it can be retried once it has finished")


async def replay_failed(runtime: Runtime, sub: Subscription, since_ms: int | None) -> int:
    """Queue a subscription's failed deliveries (created since since_ms) again; how many."""
    if sub.status == "DISABLED":
        raise Refused(409, DISABLED_MESSAGE)
    return await runtime.store.replay(sub.uuid, since_ms, "failed")


async def send_test(
    runtime: Runtime, organization: str, event_name: str, targets: Sequence[Subscription]
) -> list[tuple[str, int]]:
    """One test message (payload {"test": true}) to each target: (webhook, delivery id) pairs."""
    if any(s.status == "DISABLED" for s in targets):
        raise Refused(409, DISABLED_MESSAGE)
    event = NewEvent(organization, event_name, TEST_PAYLOAD, None, None)
    result = await runtime.store.send_to(event, [s.uuid for s in targets])
    return [(s.uuid, i) for s, i in zip(targets, result.delivery_ids, strict=True)]


async def rotate_key(runtime: Runtime, sub: Subscription, secret: str | None = None) -> str:
    """Make a new signing key current; the old one keeps signing alongside for 24h."""
    secret = secret or new_signing_key()
    # The store announces key_rotated; whoever caches the keys follows it.
    if not await runtime.store.rotate_signing_key(
        sub.organization, sub.uuid, secret, ROTATION_OVERLAP_MS
    ):
        raise Refused(404, "no such webhook")
    return secret
