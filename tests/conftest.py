"""Shared fixtures: a real pusherd (both listeners) on a real SQLite file, real receivers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pusherd.app import create_app
from pusherd.config import Config, config_from_dict
from pusherd.httpserver import AppRunner
from pusherd.keys import INGEST_APP, RUNTIME
from pusherd.runtime import Runtime
from pusherd.store import Store, open_store
from tests import loopback

# A real PostgreSQL server for the tests that ask for it (pg_server, pg_url): tests/pg.py.
pytest_plugins = ["tests.pg", "pytester"]  # pytester: tests/test_loopback.py runs a pytest

ORG = "5a0b9c1e-1d2f-4a3b-8c4d-111111111111"
OTHER_ORG = "5a0b9c1e-1d2f-4a3b-8c4d-222222222222"
ALL_SCOPES = ("READ:PURCHASE", "READ:FINANCE", "READ:USERINFO", "READ:PRODUCT")
T = TypeVar("T")
SITE = Path(__file__).resolve().parent / "loopback_site"  # installs the guard in subprocesses
# Tests whose code tried to leave loopback (refused by the guard), for the end-of-run summary.
LEFT_LOOPBACK: dict[str, list[loopback.Attempt]] = {}


@pytest.fixture(scope="session", autouse=True)
def loopback_guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No test talks to anything but loopback (tests/loopback.py): in this process, and in every
    Python subprocess the tests start (PYTHONPATH runs tests/loopback_site/sitecustomize.py
    there). Yields the file where all of them record the attempts they refused."""
    log = tmp_path_factory.mktemp("loopback") / "refused.log"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(loopback.ENV_LOG, str(log))
        paths = [str(SITE), *filter(None, [os.environ.get("PYTHONPATH")])]
        mp.setenv("PYTHONPATH", os.pathsep.join(paths))
        loopback.install()
        try:
            yield log
        finally:
            loopback.uninstall()


@pytest.fixture
def leaves_loopback() -> None:
    """Asked for by a test whose point is an attempt to leave loopback (which the guard refuses):
    a name that must not resolve, the guard's own tests."""


@pytest.fixture(autouse=True)
def _loopback_per_test(request: pytest.FixtureRequest, loopback_guard: Path) -> Iterator[None]:
    """A test whose code (its subprocesses included) tried to leave loopback fails, unless it
    asked for `leaves_loopback`: the guard kept the traffic in, but the test's set-up is wrong."""
    before = len(loopback.read_log(str(loopback_guard)))
    yield
    refused = loopback.read_log(str(loopback_guard))[before:]
    if refused:
        LEFT_LOOPBACK[request.node.nodeid] = refused
        if "leaves_loopback" not in request.fixturenames:
            pytest.fail(
                f"the test tried to leave loopback (refused by tests/loopback.py): {refused}"
            )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """List the tests whose code tried to leave loopback (the guard refused every attempt)."""
    if not LEFT_LOOPBACK:
        return
    terminalreporter.section("loopback guard: refused attempts to leave loopback")
    for nodeid, refused in LEFT_LOOPBACK.items():
        targets = sorted({f"{a.kind} {a.host}:{a.port}" for a in refused})
        terminalreporter.write_line(f"{nodeid}: {len(refused)} ({', '.join(targets)})")


def with_store(path: str, use: Callable[[Store], Awaitable[T]]) -> T:
    """Run `use` on a store of its own over the file, as a CLI command next to the daemon does
    (on a thread with its own event loop, so that sync test helpers can call it)."""

    async def run() -> T:
        store = await open_store(path, background=False)
        try:
            return await use(store)
        finally:
            await store.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, run()).result()


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    """A test config: database in tmp_path, loopback http destinations allowed, fast retries."""
    data: dict[str, Any] = {
        "storage": {"path": str(tmp_path / "pusherd.sqlite3")},
        "delivery": {
            "allow_http": True,
            "allow_private_destinations": True,
            "retry_schedule": ["50ms", "50ms", "50ms"],
            "jitter": 0.0,
            "timeout": "2s",
            "shutdown_grace": "1s",
        },
        "ratelimit": {"per_minute": 10_000, "per_hour": 100_000},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """A loopback HTTP receiver that records requests and answers scripted statuses."""

    statuses: list[int | Callable[[web.Request], Awaitable[web.StreamResponse]]] = field(
        default_factory=list
    )
    default: int = 200
    requests: list[Received] = field(default_factory=list)
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    event: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Received(dict(request.headers), body, time.monotonic()))
        self.event.set()
        answer: Any = self.statuses.pop(0) if self.statuses else self.default
        if callable(answer):
            result: web.StreamResponse = await answer(request)
            return result
        return web.Response(
            status=answer, text="ok" if answer < 300 else "nope", headers=self.headers
        )

    def events(self, name: str | None = None) -> list[Any]:
        """Received envelopes, optionally only those of one eventName."""
        out = [r.json() for r in self.requests]
        return [e for e in out if name is None or e["eventName"] == name]

    async def wait_for(self, count: int, name: str | None = None, timeout: float = 10.0) -> None:
        """Wait until `count` requests (of eventName `name`) have arrived."""
        deadline = time.monotonic() + timeout
        while len(self.events(name)) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"receiver got {len(self.events(name))} of {count} expected requests"
                )
            self.event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), min(remaining, 0.5))


@pytest.fixture
async def receiver_factory() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    servers: list[TestServer] = []

    async def make(
        statuses: list[Any] | None = None, default: int = 200, path: str = "/hook"
    ) -> Receiver:
        rec = Receiver(statuses=list(statuses or []), default=default)
        app = web.Application()
        app.router.add_post(path, rec.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        rec.url = str(server.make_url(path))
        return rec

    yield make
    for s in servers:
        await s.close()


@pytest.fixture
async def receiver(receiver_factory: Callable[..., Awaitable[Receiver]]) -> Receiver:
    return await receiver_factory()


class PusherdTestServer(TestServer):
    """A TestServer wired as `pusherd serve` wires its listeners (pusherd.httpserver.AppRunner)."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return AppRunner(self.app, **kwargs)


@dataclass
class Harness:
    """A running pusherd: API and ingest test clients over one Runtime."""

    config: Config
    api: TestClient[web.Request, web.Application]
    ingest: TestClient[web.Request, web.Application]
    runtime: Runtime

    def token(
        self,
        org: str = ORG,
        scopes: tuple[str, ...] = ALL_SCOPES,
        expires_ms: int | None = None,
        name: str = "",
    ) -> str:
        """A new API token, written by a store of its own (as `pusherd token create` does)."""
        _, secret = with_store(
            self.config.storage.path, lambda s: s.create_token(org, scopes, name, expires_ms)
        )
        return secret

    @staticmethod
    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def subscribe(
        self,
        token: str,
        destination: str,
        event_names: list[str] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Create a Zettle subscription and return its JSON (asserting 200)."""
        body = {
            "uuid": str(uuid.uuid1()),
            "transportName": "WEBHOOK",
            "eventNames": ["ProductCreated"] if event_names is None else event_names,
            "destination": destination,
            "contactEmail": "ops@example.com",
            **extra,
        }
        resp = await self.api.post(
            "/organizations/self/subscriptions", json=body, headers=self.auth(token)
        )
        assert resp.status == 200, await resp.text()
        data: dict[str, Any] = await resp.json()
        return data

    async def emit(self, event_name: str = "ProductCreated", org: str = ORG, **extra: Any) -> Any:
        """POST one event to ingest and return the JSON answer (asserting 2xx)."""
        body = {"eventName": event_name, "organizationUuid": org, "payload": {"n": 1}, **extra}
        resp = await self.ingest.post("/events", json=body)
        assert resp.status in (200, 202), await resp.text()
        return await resp.json()

    async def idle(self, timeout: float = 10.0) -> None:
        """Wait until the dispatcher has nothing due, waiting or in flight."""
        await self.runtime.dispatcher.run_until_idle(timeout)


@pytest.fixture
def harness_factory(tmp_path: Path, aiohttp_client: Any) -> Callable[..., Awaitable[Harness]]:
    async def make(config: Config | None = None, **sections: dict[str, Any]) -> Harness:
        cfg = config or make_config(tmp_path, **sections)
        app = create_app(cfg)
        api = await aiohttp_client(PusherdTestServer(app))
        ingest = await aiohttp_client(PusherdTestServer(app[INGEST_APP]))
        return Harness(cfg, api, ingest, app[RUNTIME])

    return make


@pytest.fixture
async def harness(harness_factory: Callable[..., Awaitable[Harness]]) -> Harness:
    return await harness_factory()


def replace_config(config: Config, section: str, **values: Any) -> Config:
    """A copy of config with some keys of one section changed."""
    return dataclasses.replace(
        config, **{section: dataclasses.replace(getattr(config, section), **values)}
    )
