"""Ordered plain-SQL migrations of a backend: `<package>/migrations/NNNN_name.sql`, from 1."""

from __future__ import annotations

from importlib import resources


def read_migrations(package: str) -> list[tuple[int, str]]:
    """Ordered (version, sql) pairs of `package`'s migrations folder; a gap is a packaging bug."""
    folder = resources.files(package) / "migrations"
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    found.sort()
    for expected, (version, _) in enumerate(found, start=1):
        if version != expected:
            raise RuntimeError(f"migration numbering has a gap at {expected:04d}")
    return found
