"""The OpenAPI 3.1 document, served at GET /openapi.json on the API listener.

`pusherd/openapi.json` describes every operation once, under its canonical path. The served
document adds the other forms each path answers to (a trailing slash, the `/uuid/` alias: see
`api/routes.py`) as path items of their own, copies whose operationIds carry a suffix, since an
operationId must be unique.
"""

from __future__ import annotations

import copy
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from pusherd.api import routes

DOCUMENT = "openapi.json"
METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options", "trace"})


def document_bytes() -> bytes:
    """The canonical document as shipped in the package (pusherd/openapi.json)."""
    return (resources.files("pusherd") / DOCUMENT).read_bytes()


def _alias_item(item: dict[str, Any], canonical: str, suffix: str) -> dict[str, Any]:
    alias = copy.deepcopy(item)
    for method, op in alias.items():
        if method in METHODS:
            op["operationId"] += suffix
            note = f"Same operation as {method.upper()} `{canonical}`."
            op["description"] = f"{note} {op['description']}" if "description" in op else note
    return alias


def document() -> dict[str, Any]:
    """The served document: the canonical one plus every alternative form of its paths."""
    doc: dict[str, Any] = orjson.loads(document_bytes())
    paths: dict[str, Any] = {}
    for path, item in doc["paths"].items():
        for form, suffix in routes.path_forms(path):
            paths[form] = item if form == path else _alias_item(item, path, suffix)
    doc["paths"] = paths
    return doc


def add_routes(app: web.Application) -> None:
    """Register GET /openapi.json (no authentication)."""
    body = orjson.dumps(document())

    async def openapi_document(request: web.Request) -> web.Response:
        """The OpenAPI document."""
        return web.Response(body=body, content_type="application/json")

    routes.add(app, "/" + DOCUMENT, {"GET": openapi_document})
