"""Validation and actions shared by both dialects: one model, two thin route modules.

Errors are raised as FieldError (bad input for a named field) or ScopeError; each dialect maps them
to its own status codes (Zettle: 422 for destination/contactEmail, 400 otherwise; PayStell: 400).
"""

from __future__ import annotations

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
from pusherd.store.models import (
    NewEvent,
    NewSubscription,
    Subscription,
    SubscriptionChanges,
    Token,
)

KEY_ALPHABET = string.ascii_letters + string.digits
_EMAIL_RE = re.compile(
    r"^[^@\s\"(),:;<>\[\]\\]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?\.[A-Za-z0-9-]{2,}$"
)
EMAIL_MAX = 512
DESTINATION_MAX = 2048
WELCOME_PAYLOAD = orjson.dumps({"data": "payload"}).decode()


class FieldError(Exception):
    """Bad input for one field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class ScopeError(Exception):
    """The token lacks a scope an event needs."""


def new_signing_key() -> str:
    """64 random alphanumeric characters."""
    return "".join(secrets.choice(KEY_ALPHABET) for _ in range(64))


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
    sub = await runtime.store.create_subscription(new, welcome_event(token.organization))
    await runtime.dispatcher.refresh_subscription(sub.uuid)
    return sub


async def update(
    runtime: Runtime, token: Token, sub_uuid: str, changes: SubscriptionChanges
) -> Subscription | None:
    """Apply a partial update, recording the updating token's scopes (for eventNames: [])."""
    changes = SubscriptionChanges(
        transport=changes.transport,
        event_names=changes.event_names,
        scopes=token.scopes,
        destination=changes.destination,
        contact_email=changes.contact_email,
        status=changes.status,
    )
    sub = await runtime.store.update_subscription(token.organization, sub_uuid, changes)
    if sub is not None:
        await runtime.dispatcher.refresh_subscription(sub_uuid)
        if sub.status == "DISABLED":
            runtime.close_pending_soon(sub_uuid)
    return sub


async def delete(runtime: Runtime, organization: str, sub_uuid: str) -> bool:
    """Delete a subscription and cancel its pending deliveries, also those already claimed."""
    if not await runtime.store.delete_subscription(organization, sub_uuid):
        return False
    await runtime.dispatcher.refresh_subscription(sub_uuid)
    runtime.close_pending_soon(sub_uuid)
    return True
