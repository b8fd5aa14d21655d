"""Typed application keys: everything the app owns hangs off these (no module globals)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from pusherd.runtime import Runtime
    from pusherd.store.types import Token

RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime")
INGEST_APP: web.AppKey[web.Application] = web.AppKey("ingest_app")
TOKEN_KEY: web.RequestKey[Token] = web.RequestKey("token")  # the authenticated Token


def request_token(request: web.Request) -> Token:
    """The Token the auth middleware put on this request."""
    return request[TOKEN_KEY]
