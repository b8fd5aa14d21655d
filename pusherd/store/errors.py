"""Errors every store backend raises in the same situations."""

from __future__ import annotations


class StoreError(Exception):
    """The store could not commit (disk full, I/O error, locked too long, connection lost)."""


class SchemaTooNewError(StoreError):
    """The database was written by a newer pusherd."""


class UuidTakenError(Exception):
    """A subscription with this uuid exists (or existed)."""
