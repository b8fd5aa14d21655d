"""contactEmail notices (SPEC §3): one mail per change to FAILING or DISABLED, via real SMTP."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from structlog.testing import capture_logs

from tests.conftest import Harness, Receiver, make_config

ReceiverFactory = Callable[..., Awaitable[Receiver]]
HarnessFactory = Callable[..., Awaitable[Harness]]


@dataclass
class Mailbox:
    """Messages an aiosmtpd server accepted (filled from the server's thread)."""

    port: int = 0
    messages: list[tuple[str, list[str], Message]] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = message_from_bytes(envelope.original_content or envelope.content)
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 Message accepted for delivery"

    def mails(self) -> list[tuple[str, list[str], Message]]:
        with self.lock:
            return list(self.messages)

    async def wait_for(self, count: int, deadline_s: float = 10.0) -> None:
        deadline = time.monotonic() + deadline_s
        while len(self.mails()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"got {len(self.mails())} of {count} mails")
            await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(mailbox: Mailbox, **kwargs: Any) -> Controller:
    mailbox.port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=mailbox.port, **kwargs)
    controller.start()
    return controller


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    controller = start_server(box)
    yield box
    controller.stop()


def smtp_config(tmp_path: Path, mailbox: Mailbox, **extra: Any) -> Any:
    return make_config(
        tmp_path,
        smtp={"host": "127.0.0.1", "port": mailbox.port, "from": "relay@example.org", **extra},
        delivery={"retry_schedule": ["100ms"] * 5, "disable_after": "250ms"},
    )


async def settle(h: Harness) -> None:
    """Every attempt made and every notice mail handed to the server."""
    await h.idle()
    await h.runtime.notifier.drain()


async def test_one_mail_on_failing_and_one_on_disabled(
    tmp_path: Path,
    harness_factory: HarnessFactory,
    receiver_factory: ReceiverFactory,
    mailbox: Mailbox,
) -> None:
    h = await harness_factory(smtp_config(tmp_path, mailbox))
    receiver = await receiver_factory(default=500)
    token = h.token()
    sub = await h.subscribe(token, receiver.url, contactEmail="owner@example.com")
    await mailbox.wait_for(2)

    async def disabled() -> bool:
        resp = await h.api.get("/api/webhooks/register", headers=h.auth(token))
        return (await resp.json())["data"]["isActive"] is False

    deadline = time.monotonic() + 10
    while not await disabled():
        assert time.monotonic() < deadline, "subscription never became DISABLED"
        await asyncio.sleep(0.02)
    await settle(h)

    # Several failed attempts, yet exactly two mails: FAILING, then DISABLED.
    assert len(receiver.requests) >= 3
    mails = mailbox.mails()
    assert len(mails) == 2
    for sender, recipients, msg in mails:
        assert sender == "relay@example.org"
        assert recipients == ["owner@example.com"]
        assert msg["To"] == "owner@example.com"
        assert sub["uuid"] in msg["Subject"]
    assert "FAILING" in mails[0][2]["Subject"]
    assert "DISABLED" in mails[1][2]["Subject"]
    assert receiver.url in mails[1][2].get_payload()

    # No more deliveries go to it, and no more mail.
    assert (await h.emit("ProductCreated"))["deliveries"] == 0
    await settle(h)
    assert len(mailbox.mails()) == 2


async def test_410_disables_at_once_with_one_mail(
    tmp_path: Path,
    harness_factory: HarnessFactory,
    receiver_factory: ReceiverFactory,
    mailbox: Mailbox,
) -> None:
    h = await harness_factory(smtp_config(tmp_path, mailbox))
    receiver = await receiver_factory(default=410)
    token = h.token()
    await h.subscribe(token, receiver.url, contactEmail="gone@example.com")
    await mailbox.wait_for(1)
    await settle(h)
    assert len(receiver.requests) == 1
    [(_, recipients, msg)] = mailbox.mails()
    assert recipients == ["gone@example.com"]
    assert "DISABLED" in msg["Subject"]


async def test_failing_again_after_recovery_mails_again(
    tmp_path: Path,
    harness_factory: HarnessFactory,
    receiver_factory: ReceiverFactory,
    mailbox: Mailbox,
) -> None:
    cfg = smtp_config(tmp_path, mailbox)
    h = await harness_factory(cfg)
    receiver = await receiver_factory(statuses=[500, 200, 500, 200])
    token = h.token()
    await h.subscribe(token, receiver.url, contactEmail="ops@example.com")
    await receiver.wait_for(2, "TestMessage")
    await h.emit("ProductCreated")
    await receiver.wait_for(2, "ProductCreated")
    await mailbox.wait_for(2)
    await settle(h)
    subjects = [m["Subject"] for _, _, m in mailbox.mails()]
    assert len(subjects) == 2 and all("FAILING" in s for s in subjects)


async def test_smtp_login(
    tmp_path: Path, harness_factory: HarnessFactory, receiver_factory: ReceiverFactory
) -> None:
    box = Mailbox()

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            b"relay",
            b"hunter2",
        )
        if ok:
            box.logins.append(data.login.decode())
        return AuthResult(success=ok)

    controller = start_server(box, authenticator=authenticate, auth_require_tls=False)
    try:
        h = await harness_factory(smtp_config(tmp_path, box, username="relay", password="hunter2"))
        receiver = await receiver_factory(default=410)
        await h.subscribe(h.token(), receiver.url, contactEmail="ops@example.com")
        await box.wait_for(1)
        assert box.logins == ["relay"]
    finally:
        controller.stop()


async def test_without_smtp_host_the_notice_is_logged(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    receiver = await receiver_factory(default=410)
    with capture_logs() as logs:
        sub = await harness.subscribe(harness.token(), receiver.url, contactEmail="ops@example.com")
        await receiver.wait_for(1)
        await settle(harness)
    notices = [e for e in logs if e["event"] == "subscription_status_changed"]
    assert len(notices) == 1
    notice = notices[0]
    assert notice["subscription"] == sub["uuid"]
    assert (notice["old"], notice["new"]) == ("ACTIVE", "DISABLED")
    assert notice["contact_email"] == "ops@example.com"
    assert notice["mailed"] is False


async def test_webhook_without_contact_email_is_only_logged(
    tmp_path: Path,
    harness_factory: HarnessFactory,
    receiver_factory: ReceiverFactory,
    mailbox: Mailbox,
) -> None:
    h = await harness_factory(smtp_config(tmp_path, mailbox))
    receiver = await receiver_factory(default=410)
    with capture_logs() as logs:
        resp = await h.api.post(
            "/api/webhooks/register",
            json={"url": receiver.url, "eventTypes": []},
            headers=h.auth(h.token()),
        )
        assert resp.status == 201
        await receiver.wait_for(1)
        await settle(h)
    notices = [e for e in logs if e["event"] == "subscription_status_changed"]
    assert [n["new"] for n in notices] == ["DISABLED"]
    assert notices[0]["contact_email"] is None and notices[0]["mailed"] is False
    assert mailbox.mails() == []
