"""Console sessions, CSRF, security headers and the rate limit (SPEC §9 "Who sees what", "Safety").

Sessions live in memory: a cookie holds a random id, the server keeps who it is. A session made
from an API token keeps the token's id (never its secret) and ends when the token is revoked or
expires; one made from a console-link is bound to the link's organization.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from pusherd.keys import RUNTIME

COOKIE = "pusherd_console"
PRE_COOKIE = "pusherd_console_pre"  # double-submit CSRF value of the sign-in forms
IDLE_S = 12 * 3600.0
MAX_SESSIONS = 10_000
PREFIX = "/console"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # a sign-in link's secret is in its URL
    "Cache-Control": "no-store",
}
# Reachable without a session (the sign-in pages and the stylesheet).
OPEN_PATHS = frozenset({PREFIX + "/signin", PREFIX + "/link"})


@dataclass
class Session:
    """Who is signed in: one organization, or every one (organization None, an ADMIN)."""

    id: str
    organization: str | None
    home: str  # the organization the rate limit counts against
    label: str  # shown in the header: what signed in
    token_id: str | None
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    last_seen: float = field(default_factory=time.monotonic)
    flash: list[str] = field(default_factory=list)

    @property
    def admin(self) -> bool:
        return self.organization is None


class Sessions:
    """The console's sessions, in memory, with a 12h idle expiry."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_id: dict[str, Session] = {}

    def create(
        self, organization: str | None, home: str, label: str, token_id: str | None
    ) -> Session:
        """A new session with a fresh id (never one a visitor brought along)."""
        if len(self._by_id) >= MAX_SESSIONS:
            self._evict()
        s = Session(secrets.token_urlsafe(32), organization, home, label, token_id)
        s.last_seen = self._clock()
        self._by_id[s.id] = s
        return s

    def get(self, sid: str | None) -> Session | None:
        """The live session of this id (touching it), or None."""
        if not sid:
            return None
        s = self._by_id.get(sid)
        if s is None:
            return None
        now = self._clock()
        if now - s.last_seen > IDLE_S:
            del self._by_id[sid]
            return None
        s.last_seen = now
        return s

    def end(self, sid: str) -> None:
        """Sign out."""
        self._by_id.pop(sid, None)

    def _evict(self) -> None:
        now = self._clock()
        for sid, s in list(self._by_id.items()):
            if now - s.last_seen > IDLE_S:
                del self._by_id[sid]
        while len(self._by_id) >= MAX_SESSIONS:  # still full: the least recently used go
            oldest = min(self._by_id.values(), key=lambda s: s.last_seen)
            del self._by_id[oldest.id]


SESSIONS: web.AppKey[Sessions] = web.AppKey("console_sessions", Sessions)
SESSION_KEY: web.RequestKey[Session] = web.RequestKey("console_session", Session)


def see_other(location: str) -> web.Response:
    """A 303 to another console page (after a form post)."""
    return web.Response(status=303, headers={"Location": location})


def session_of(request: web.Request) -> Session:
    """The signed-in session the middleware put on this request."""
    return request[SESSION_KEY]


def set_cookie(response: web.StreamResponse, request: web.Request, name: str, value: str) -> None:
    """A console cookie: HttpOnly, SameSite=Strict, Secure over https, path /console."""
    response.set_cookie(
        name,
        value,
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=is_https(request),
    )


def is_https(request: web.Request) -> bool:
    """The request came over https (directly, or through a proxy that base_url says is https)."""
    base = request.app[RUNTIME].config.console.base_url
    return request.secure or base.startswith("https://")


def csrf_ok(expected: str | None, given: object) -> bool:
    """The form's CSRF token matches (constant-time)."""
    return (
        bool(expected)
        and isinstance(given, str)
        and hmac.compare_digest(expected.encode(), given.encode())  # type: ignore[union-attr]
    )


def pre_token(request: web.Request) -> str:
    """The sign-in forms' CSRF value (the cookie's, or a new one the caller must set)."""
    return request.cookies.get(PRE_COOKIE) or secrets.token_urlsafe(32)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    """An HTML error answer (the console's pages never show JSON errors)."""
    from pusherd.console.render import render

    return render(request, "error.html", {"status": status, "message": message}, status=status)


@web.middleware
async def console_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers everywhere; a session (and the rate limit, and CSRF on POST) for pages."""
    try:
        response = await _guarded(request, handler)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_page(request, exc.status, exc.reason)
        for name in ("Retry-After", "Allow"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
    response.headers.update(SECURITY_HEADERS)
    return response


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(PREFIX + "/static/"):
        return await handler(request)
    if request.path in OPEN_PATHS:
        if request.method == "POST":
            form = await request.post()
            if not csrf_ok(request.cookies.get(PRE_COOKIE), form.get("csrf")):
                raise web.HTTPForbidden(reason="the form was missing its CSRF token; try again")
        return await handler(request)
    runtime = request.app[RUNTIME]
    sessions = request.app[SESSIONS]
    session = sessions.get(request.cookies.get(COOKIE))
    if session is not None and session.token_id is not None:
        token = await runtime.store.console.token_by_id(session.token_id)
        if token is None or token.status(int(time.time() * 1000)) != "active":
            sessions.end(session.id)  # the token was revoked or ran out: so did the session
            session = None
    if session is None:
        if request.method != "GET":
            raise web.HTTPForbidden(reason="not signed in")
        raise web.HTTPSeeOther(PREFIX + "/signin")
    verdict = runtime.ratelimiter.hit(session.home)
    if not verdict.allowed:
        raise web.HTTPTooManyRequests(
            reason="rate limit exceeded; try again later",
            headers={"Retry-After": str(verdict.retry_after_s)},
        )
    if request.method == "POST":
        form = await request.post()
        if not csrf_ok(session.csrf, form.get("csrf")):
            raise web.HTTPForbidden(reason="the form was missing its CSRF token; reload the page")
    request[SESSION_KEY] = session
    return await handler(request)
