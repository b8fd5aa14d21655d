"""The OpenAPI 3.1 document, served at GET /openapi.json on the API listener."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

DOCUMENT = "openapi.json"


def document_bytes() -> bytes:
    """The document as shipped in the package (pusherd/openapi.json)."""
    return (resources.files("pusherd") / DOCUMENT).read_bytes()


def add_routes(app: web.Application) -> None:
    """Register GET /openapi.json (no authentication)."""
    body = document_bytes()

    async def openapi_document(request: web.Request) -> web.Response:
        """The OpenAPI document."""
        return web.Response(body=body, content_type="application/json")

    app.router.add_get("/" + DOCUMENT, openapi_document, allow_head=False)
