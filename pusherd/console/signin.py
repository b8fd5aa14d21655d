"""Signing in (an API token, or a one-time console-link) and out."""

from __future__ import annotations

from aiohttp import web

from pusherd.auth import ADMIN
from pusherd.clock import now_ms
from pusherd.console.render import render
from pusherd.console.session import (
    COOKIE,
    PRE_COOKIE,
    PREFIX,
    SESSIONS,
    pre_token,
    see_other,
    session_of,
    set_cookie,
)
from pusherd.keys import RUNTIME


def _signin_page(request: web.Request, message: str = "", status: int = 200) -> web.Response:
    pre = pre_token(request)
    response = render(request, "signin.html", {"pre": pre, "message": message}, status=status)
    set_cookie(response, request, PRE_COOKIE, pre)
    return response


async def signin_form(request: web.Request) -> web.Response:
    """GET /console/signin: the token form."""
    return _signin_page(request)


async def signin(request: web.Request) -> web.StreamResponse:
    """POST /console/signin: an API token in, a session cookie out (the token is not kept)."""
    form = await request.post()
    secret = form.get("token")
    runtime = request.app[RUNTIME]
    token = None
    if isinstance(secret, str) and secret.strip():
        token = await runtime.store.find_token(secret.strip())
    if token is None or token.status(now_ms()) != "active":
        return _signin_page(request, "That token is not valid (unknown, revoked or expired).", 401)
    admin = ADMIN in token.scopes
    label = f"token {token.id}" + (f" ({token.name})" if token.name else "")
    session = await request.app[SESSIONS].create(
        None if admin else token.organization, token.organization, label, token.id
    )
    response = see_other(PREFIX + "/")
    set_cookie(response, request, COOKIE, session.id)
    response.del_cookie(PRE_COOKIE, path=PREFIX)
    return response


async def link(request: web.Request) -> web.Response:
    """GET /console/link?t=SECRET: a one-time sign-in link; refused once used or expired."""
    secret = request.query.get("t", "")
    org = await request.app[RUNTIME].store.console.redeem_link(secret) if secret else None
    if org is None:
        return render(
            request,
            "error.html",
            {
                "status": 403,
                "message": "This sign-in link has already been used or has expired. "
                "Ask for a new one (pusherd console-link), or sign in with an API token.",
            },
            status=403,
        )
    session = await request.app[SESSIONS].create(org, org, "console link", None)
    # A page, not a redirect: after a cross-site click (a link in a mail) a SameSite=Strict
    # cookie is sent only once the browser moves on from this page itself.
    response = render(request, "linked.html", {"organization": org})
    set_cookie(response, request, COOKIE, session.id)
    return response


async def signout(request: web.Request) -> web.StreamResponse:
    """POST /console/signout: end the session."""
    await request.app[SESSIONS].end(session_of(request).id)
    response = see_other(PREFIX + "/signin")
    response.del_cookie(COOKIE, path=PREFIX)
    return response


def add_routes(app: web.Application) -> None:
    """Register the sign-in routes."""
    app.router.add_get("/signin", signin_form, allow_head=False)
    app.router.add_post("/signin", signin)
    app.router.add_get("/link", link, allow_head=False)
    app.router.add_post("/signout", signout)
