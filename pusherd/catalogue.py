"""Event types and the scopes they need (seed 000, "Supported events"), extendable from config."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pusherd.config import EventType

ANY_SCOPE = "*"

BUILTIN_EVENTS: dict[str, str] = {
    "PurchaseCreated": "READ:PURCHASE",
    "InvoiceCreated": "READ:FINANCE",
    "OrganizationUpdated": "READ:USERINFO",
    "OrganizationFeatureUpdated": "READ:USERINFO",
    "PaymentInitiated": "READ:FINANCE",
    "PaymentCreated": "READ:FINANCE",
    "PaymentCanceled": "READ:FINANCE",
    "CardPaymentAuthorized": "READ:FINANCE",
    "CardPaymentInvalid": "READ:FINANCE",
    "ProductCreated": "READ:PRODUCT",
    "ProductUpdated": "READ:PRODUCT",
    "ProductDeleted": "READ:PRODUCT",
    "InventoryBalanceChanged": "READ:PRODUCT",
    "InventoryTrackingStarted": "READ:PRODUCT",
    "InventoryTrackingStopped": "READ:PRODUCT",
    "ApplicationConnectionRemoved": ANY_SCOPE,
    "PersonalAssertionDeleted": ANY_SCOPE,
}

# Sent by pusherd itself (subscription created, PayStell test sends); not subscribable.
TEST_MESSAGE = "TestMessage"


class Catalogue:
    """Known event names and the scope each one needs."""

    def __init__(self, extra: Iterable[EventType] = ()) -> None:
        self._scopes = dict(BUILTIN_EVENTS)
        for event in extra:
            self._scopes[event.name] = event.scope

    def __contains__(self, name: object) -> bool:
        return name in self._scopes

    def names(self) -> list[str]:
        """Every known event name."""
        return list(self._scopes)

    def scope_of(self, name: str) -> str | None:
        """The scope an event needs, ANY_SCOPE, or None when the event is unknown."""
        return self._scopes.get(name)

    def allowed(self, name: str, scopes: Iterable[str]) -> bool:
        """Whether a token with these scopes may subscribe to this event."""
        need = self._scopes.get(name)
        if need is None:
            return False
        held = set(scopes)
        return bool(held) if need == ANY_SCOPE else need in held

    def matches(self, event_name: str, event_names: Sequence[str], scopes: Sequence[str]) -> bool:
        """Whether a subscription (its eventNames and the scopes it was made with) wants it."""
        if event_names:
            return event_name in event_names
        return self.allowed(event_name, scopes)
