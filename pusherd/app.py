"""create_app(config): wires the two listeners' apps, cleanup contexts, middleware and routes."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from pusherd.api import ingest, paystell, routes, zettle
from pusherd.api.errors import error_middleware
from pusherd.api.ingest import healthz
from pusherd.auth import auth_middleware
from pusherd.config import Config
from pusherd.keys import INGEST_APP, RUNTIME
from pusherd.log import guard_server_logs
from pusherd.openapi import add_routes as add_openapi_routes
from pusherd.runtime import Runtime


def create_app(config: Config, *, dispatch: bool = True) -> web.Application:
    """The API app; the ingest app hangs off it under INGEST_APP and shares its Runtime."""
    guard_server_logs()  # never a token in a log, whoever configured logging
    runtime = Runtime(config)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await runtime.start(dispatch=dispatch)
        yield
        await runtime.stop()

    api = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=1024**2)
    api[RUNTIME] = runtime
    api.cleanup_ctx.append(lifecycle)
    routes.add(api, "/healthz", {"GET": healthz})
    add_openapi_routes(api)
    zettle.add_routes(api)
    paystell.add_routes(api)

    ingest_app = web.Application(
        middlewares=[error_middleware], client_max_size=config.ingest.max_body
    )
    ingest_app[RUNTIME] = runtime
    ingest.add_routes(ingest_app)
    api[INGEST_APP] = ingest_app
    return api
