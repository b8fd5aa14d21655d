"""Console sessions, CSRF, security headers and the rate limit (SPEC §9 "Who sees what", "Safety").

A cookie holds a random id; the store keeps who it is (only a hash of the id), so every process
on one database knows the session and a restart signs nobody out. Each request reads the row:
signing out through one process is refused by every other at once, with no cache to go stale.
A session made from an API token keeps the token's id (never its secret) and ends when the token
is revoked or expires; one made from a console-link is bound to the link's organization.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from pusherd.clock import now_ms
from pusherd.keys import RUNTIME
from pusherd.store.console import ConsoleStore, SessionRecord

COOKIE = "pusherd_console"
PRE_COOKIE = "pusherd_console_pre"  # double-submit CSRF value of the sign-in forms
IDLE_S = 12 * 3600.0
# The idle expiry moves on at most this often per session: not a write per page view.
TOUCH_EVERY_MS = 60_000
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
    last_seen_ms: int = 0
    # Messages for the next page; what a request leaves here is stored when it ends.
    flash: list[str] = field(default_factory=list)
    stored_flash: bool = False  # the store holds messages for this session

    @property
    def admin(self) -> bool:
        return self.organization is None


class Sessions:
    """The console's sessions, kept by the store, with a 12h idle expiry."""

    def __init__(
        self, store: Callable[[], ConsoleStore], clock_ms: Callable[[], int] = now_ms
    ) -> None:
        self._store = store  # the runtime's store is opened after the app is made
        self._clock_ms = clock_ms

    async def create(
        self, organization: str | None, home: str, label: str, token_id: str | None
    ) -> Session:
        """A new session with a fresh id (never one a visitor brought along)."""
        now = self._clock_ms()
        s = Session(secrets.token_urlsafe(32), organization, home, label, token_id)
        s.last_seen_ms = now
        record = SessionRecord(
            organization, home, label, token_id, s.csrf, now, now, now + int(IDLE_S * 1000)
        )
        await self._store().create_session(s.id, record)
        return s

    async def get(self, sid: str | None) -> Session | None:
        """The live session of this id (touching it about once a minute), or None."""
        if not sid:
            return None
        now = self._clock_ms()
        r = await self._store().session(sid, now)
        if r is None:
            return None
        if now - r.last_seen_ms >= TOUCH_EVERY_MS:
            await self._store().touch_session(sid, now, now + int(IDLE_S * 1000))
        s = Session(sid, r.organization, r.home, r.label, r.token_id, r.csrf, r.last_seen_ms)
        s.stored_flash = bool(r.flash)
        return s

    async def end(self, sid: str) -> None:
        """Sign out (in every process: the row is gone)."""
        await self._store().end_session(sid)

    async def take_flash(self, session: Session) -> None:
        """Move the stored messages onto the session, for the page about to be rendered."""
        if session.stored_flash:
            session.flash = [*await self._store().take_flash(session.id), *session.flash]
            session.stored_flash = False

    async def keep_flash(self, session: Session) -> None:
        """Store the messages no page showed, for the next one (whichever process serves it)."""
        if session.flash:
            messages, session.flash = session.flash, []
            await self._store().add_flash(session.id, messages)


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
    session = await sessions.get(request.cookies.get(COOKIE))
    if session is not None and session.token_id is not None:
        token = await runtime.store.console.token_by_id(session.token_id)
        if token is None or token.status(now_ms()) != "active":
            await sessions.end(session.id)  # the token was revoked or ran out: so did the session
            session = None
    if session is None:
        if request.method != "GET":
            raise web.HTTPForbidden(reason="not signed in")
        raise web.HTTPSeeOther(PREFIX + "/signin")
    verdict = await runtime.rate_hit(session.home)  # across every process on PostgreSQL
    if not verdict.allowed:
        raise web.HTTPTooManyRequests(
            reason="rate limit exceeded; try again later",
            headers={"Retry-After": str(verdict.retry_after_s)},
        )
    if request.method == "POST":
        form = await request.post()
        if not csrf_ok(session.csrf, form.get("csrf")):
            raise web.HTTPForbidden(reason="the form was missing its CSRF token; reload the page")
    if request.method == "GET":
        await sessions.take_flash(session)  # a page: it shows what an action left for it
    request[SESSION_KEY] = session
    try:
        return await handler(request)
    finally:
        await sessions.keep_flash(session)
