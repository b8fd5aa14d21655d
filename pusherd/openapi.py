"""The OpenAPI 3.1 document, served at GET /openapi.json on the API listener."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register GET /openapi.json."""
