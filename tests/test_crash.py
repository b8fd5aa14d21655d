"""Crash safety: every acknowledged event arrives after `kill -9` and a restart (SPEC §5, §6)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import ORG, Receiver
from tests.service import Listeners, free_port, run_cli_async

PRODUCT = "READ:PRODUCT"


@dataclass
class Daemon(Listeners):
    """`pusherd serve` as a real subprocess on free loopback ports, database in tmp_path."""

    tmp_path: Path
    delivery: dict[str, str]
    api_port: int = field(default_factory=free_port)
    ingest_port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def config_path(self) -> Path:
        return self.tmp_path / "pusherd.toml"

    def write_config(self) -> None:
        delivery = {
            "allow_http": "true",
            "allow_private_destinations": "true",
            "jitter": "0.0",
            **self.delivery,
        }
        lines = [
            "[api]",
            f'listen = "127.0.0.1:{self.api_port}"',
            "[ingest]",
            f'listen = "127.0.0.1:{self.ingest_port}"',
            "[storage]",
            f'path = "{self.tmp_path / "pusherd.sqlite3"}"',
            "[log]",
            'level = "info"',
            'format = "json"',
            "[delivery]",
            *(f"{k} = {v}" for k, v in delivery.items()),
        ]
        self.config_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    async def token(self, org: str = ORG, scope: str = PRODUCT) -> str:
        """A token made with the CLI, as an operator would."""
        code, out, err = await run_cli_async(
            "token", "create", "--config", str(self.config_path), "--org", org, "--scope", scope
        )
        assert code == 0, err
        return out.strip()

    async def start(self) -> None:
        """Start serving and wait until both listeners answer /healthz."""
        self.starts += 1
        log = open(self.tmp_path / f"serve-{self.starts}.log", "wb")  # noqa: SIM115, ASYNC230
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "pusherd",
                "serve",
                "--config",
                str(self.config_path),
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = time.monotonic() + 20
        async with aiohttp.ClientSession() as session:
            for base in (self.api, self.ingest):
                while True:
                    assert self.proc.returncode is None, self.logs()
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(f"{base}/healthz") as resp:
                            if resp.status == 200:
                                break
                    assert time.monotonic() < deadline, "pusherd serve did not come up"
                    await asyncio.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.tmp_path.glob("serve-*.log"))
        )

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait(self, limit_s: float = 20.0) -> int:
        """Wait for the process to exit; return its exit code."""
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), limit_s)
        return code

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def subscribe(self, token: str, destination: str) -> dict[str, Any]:
        body = {
            "uuid": str(uuid.uuid1()),
            "transportName": "WEBHOOK",
            "eventNames": ["ProductCreated"],
            "destination": destination,
            "contactEmail": "ops@example.com",
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{self.api}/organizations/self/subscriptions",
                json=body,
                headers={"Authorization": f"Bearer {token}"},
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()
            data: dict[str, Any] = await resp.json()
            return data


@pytest.fixture
async def daemons(tmp_path: Path) -> AsyncIterator[list[Daemon]]:
    """Daemons the test starts; killed at teardown whatever happened."""
    made: list[Daemon] = []
    yield made
    for d in made:
        await d.kill()


async def start_receiver(port: int, receiver: Receiver) -> TestServer:
    """A receiver listening on a fixed port (the one the subscription points at)."""
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    receiver.url = str(server.make_url("/hook"))
    return server


async def test_acknowledged_events_survive_kill_9(tmp_path: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(
        tmp_path,
        {"lease": '"1s"', "retry_schedule": '["200ms", "200ms", "200ms", "200ms", "200ms"]'},
    )
    daemons.append(daemon)
    daemon.write_config()
    token = await daemon.token()
    await daemon.start()
    receiver_port = free_port()  # nothing listens there yet: the receiver is down
    await daemon.subscribe(token, f"http://127.0.0.1:{receiver_port}/hook")

    acknowledged: set[str] = set()
    enough = asyncio.Event()

    async def producer(session: aiohttp.ClientSession, first: int) -> None:
        for i in range(first, first + 25):
            event = {
                "eventName": "ProductCreated",
                "organizationUuid": ORG,
                "payload": {"n": i},
                "messageId": f"crash-{i}",
            }
            try:
                async with session.post(f"{daemon.ingest}/events", json=event) as resp:
                    if resp.status == 202:
                        acknowledged.add((await resp.json())["messageUuid"])
            except aiohttp.ClientError:
                return  # the daemon was killed under us: this one was never acknowledged
            if len(acknowledged) >= 150:
                enough.set()

    async with aiohttp.ClientSession() as session:
        producers = [asyncio.create_task(producer(session, first)) for first in range(0, 200, 25)]
        await asyncio.wait_for(enough.wait(), 30)
        await daemon.kill()  # SIGKILL while producers are still sending
        await asyncio.gather(*producers)
    assert len(acknowledged) >= 150

    receiver = Receiver()
    server = await start_receiver(receiver_port, receiver)
    try:
        await daemon.start()
        # Well under the breaker's 30s pause: a pause of the killed process must not outlive it
        # by more than a lease.
        deadline = time.monotonic() + 15
        while not acknowledged <= {e["messageUuid"] for e in receiver.events("ProductCreated")}:
            assert time.monotonic() < deadline, (
                f"{len(acknowledged - {e['messageUuid'] for e in receiver.events()})}"
                " acknowledged events never arrived"
            )
            receiver.event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(receiver.event.wait(), 0.5)
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait() == 0
    finally:
        await server.close()
