"""Bearer tokens, scopes, organization resolution ("self"), and the per-organization rate limit."""

from __future__ import annotations

import dataclasses
import uuid

from aiohttp import web
from aiohttp.typedefs import Handler

from pusherd.clock import now_ms
from pusherd.errors import ApiError
from pusherd.keys import RUNTIME, TOKEN_KEY, request_token

PUBLIC_PATHS = frozenset({"/healthz", "/healthz/", "/openapi.json", "/openapi.json/"})
ADMIN = "ADMIN"  # an operator's scope: any organization in a path, every one in the console
CONSOLE_PREFIX = "/console"  # the console signs in with a session cookie, checked by itself


def bearer(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None.

    aiohttp decodes header bytes that are not UTF-8 into lone surrogates, which no token holds
    and which cannot be encoded (for hashing, for comparing): such a header names no token.
    """
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or " " in value:
        return None
    try:
        value.encode()
    except UnicodeEncodeError:
        return None
    return value


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """401 without a valid token; then the rate limit, whose headers go on every answer."""
    if request.path in PUBLIC_PATHS or request.path.startswith(CONSOLE_PREFIX):
        return await handler(request)
    if request.match_info.http_exception is not None and "Authorization" not in request.headers:
        return await handler(request)  # an unknown route or method, asked anonymously
    runtime = request.app[RUNTIME]
    secret = bearer(request)
    token = await runtime.store.find_token(secret) if secret else None
    if token is None:
        raise ApiError(401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"})
    state = token.status(now_ms())
    if state != "active":
        raise ApiError(401, f"token is {state}", {"WWW-Authenticate": "Bearer"})
    request[TOKEN_KEY] = token
    verdict = await runtime.rate_hit(token.organization)
    headers = {
        "X-RateLimit-Limit": str(verdict.limit),
        "X-RateLimit-Remaining": str(verdict.remaining),
        "X-RateLimit-Reset": str(verdict.reset_s),
    }
    if not verdict.allowed:
        raise ApiError(
            429, "rate limit exceeded", {**headers, "Retry-After": str(verdict.retry_after_s)}
        )
    try:
        response = await handler(request)
    except ApiError as exc:
        exc.headers.update(headers)
        raise
    except web.HTTPException as exc:  # aiohttp's own 404/405/413: still an authenticated answer
        exc.headers.update(headers)
        raise
    response.headers.update(headers)
    return response


def resolve_org(request: web.Request, value: str) -> str:
    """The organization a path names: the token's own or "self"; any other → 403.

    An ADMIN token may name any organization: for the rest of the request it then acts as a
    token of that organization (with its own scopes), so every handler stays as it is.
    """
    token = request_token(request)
    if value == "self" or value == token.organization:
        return token.organization
    try:
        named = str(uuid.UUID(value))
    except ValueError:
        named = ""
    if named == token.organization:
        return token.organization
    if named and ADMIN in token.scopes:
        request[TOKEN_KEY] = dataclasses.replace(token, organization=named)
        return named
    raise ApiError(403, "this token does not belong to that organization")
