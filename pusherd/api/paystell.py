"""PayStell dialect: /api/webhooks/... (SPEC §4)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the PayStell routes."""
