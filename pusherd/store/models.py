"""The store's types under their former module name (modules not yet moved to store.types)."""

from __future__ import annotations

from pusherd.store.types import *  # noqa: F403
from pusherd.store.types import ClaimedDelivery

__all__ = ["ClaimedDelivery"]
