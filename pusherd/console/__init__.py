"""The web console (SPEC §9) at /console/ on the API listener: server-rendered pages and forms.

Its actions call the same functions as the API (pusherd.api.subscriptions); its reads go through
the store's console interface (pusherd.store.console).
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from pusherd.console import actions, pages, signin
from pusherd.console.render import environment
from pusherd.console.session import PREFIX, SESSIONS, Sessions, console_middleware
from pusherd.keys import RUNTIME
from pusherd.runtime import Runtime


def console_app(runtime: Runtime) -> web.Application:
    """The console as a sub-application, mounted at /console by add_console()."""
    app = web.Application(middlewares=[console_middleware], client_max_size=64 * 1024)
    app[RUNTIME] = runtime
    app[SESSIONS] = Sessions(lambda: runtime.store.console)
    environment(app)
    static = resources.files("pusherd.console") / "static"
    app.router.add_static("/static/", str(static))
    signin.add_routes(app)
    pages.add_routes(app)
    actions.add_routes(app)
    return app


def add_console(api: web.Application, runtime: Runtime) -> None:
    """Mount the console on the API app (unless [console] enabled = false: then /console is 404)."""
    if not runtime.config.console.enabled:
        return

    async def to_index(request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect(PREFIX + "/")

    api.router.add_get(PREFIX, to_index, allow_head=False)
    api.add_subapp(PREFIX, console_app(runtime))
