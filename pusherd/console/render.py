"""Rendering helpers: the Jinja2 environment (autoescaped) and what every page's context holds."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from pusherd.console.session import SESSION_KEY

STATUS_CLASS = {
    "ACTIVE": "ok",
    "FAILING": "warn",
    "DISABLED": "bad",
    "delivered": "ok",
    "pending": "warn",
    "failed": "bad",
    "cancelled": "bad",
}


def when(ms: int | None) -> str:
    """A unix-ms time as `YYYY-MM-DD HH:MM:SS UTC` ("—" for none)."""
    if ms is None:
        return "—"
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def age(seconds: float | None) -> str:
    """A duration in words: 45s, 3m 12s, 2h 5m, 3d 4h."""
    if seconds is None:
        return "—"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def duration_ms(value: float | None) -> str:
    """Milliseconds with a sensible precision."""
    if value is None:
        return "—"
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def environment(app: web.Application) -> jinja2.Environment:
    """Set up aiohttp-jinja2 on the console app: package templates, autoescaping always on."""
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("pusherd.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        filters={"when": when, "age": age, "duration_ms": duration_ms},
    )
    env.globals["status_class"] = STATUS_CLASS
    return env


def render(
    request: web.Request, name: str, context: Mapping[str, Any], *, status: int = 200
) -> web.Response:
    """Render a page with the session (if any), its CSRF token and its pending messages."""
    session = request.get(SESSION_KEY)
    flash: list[str] = []
    if session is not None:
        flash, session.flash = session.flash, []
    full = {"session": session, "flash": flash, "csrf": session.csrf if session else "", **context}
    return aiohttp_jinja2.render_template(name, request, full, status=status)
