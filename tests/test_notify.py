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

from pusherd.config import SmtpConfig
from pusherd.notify import Notifier
from pusherd.store.models import StatusChange
from tests.conftest import ORG, Harness, Receiver, make_config

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


async def test_failing_again_after_recovery_mails_again_with_repeat_after_zero(
    tmp_path: Path,
    harness_factory: HarnessFactory,
    receiver_factory: ReceiverFactory,
    mailbox: Mailbox,
) -> None:
    cfg = smtp_config(tmp_path, mailbox, repeat_after="0s")
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


async def test_a_flapping_subscription_gets_one_failing_mail_and_its_disabled_mail(
    tmp_path: Path,
    harness_factory: HarnessFactory,
    receiver_factory: ReceiverFactory,
    mailbox: Mailbox,
) -> None:
    h = await harness_factory(smtp_config(tmp_path, mailbox))  # repeat_after: 24h by default
    receiver = await receiver_factory(statuses=[500, 200] * 4 + [410])
    token = h.token()
    with capture_logs() as logs:
        await h.subscribe(token, receiver.url, contactEmail="ops@example.com")
        await receiver.wait_for(2, "TestMessage")
        for n in range(1, 4):  # each fails once, then goes through: ACTIVE -> FAILING -> ACTIVE
            await h.emit()
            await receiver.wait_for(2 * n, "ProductCreated")
        await h.emit()  # 410: DISABLED
        await receiver.wait_for(7, "ProductCreated")
        await mailbox.wait_for(2)
        await settle(h)

    subjects = [m["Subject"] for _, _, m in mailbox.mails()]
    assert len(subjects) == 2, subjects
    assert "FAILING" in subjects[0] and "DISABLED" in subjects[1]
    assert [e["new"] for e in logs if e["event"] == "notice_mailed"] == ["FAILING", "DISABLED"]
    # The three later changes to FAILING are logged, at info level.
    changes = [e for e in logs if e["event"] == "subscription_status_changed"]
    repeats = [e for e in changes if e["new"] == "FAILING"]
    assert [(e["log_level"], e["repeated"]) for e in repeats] == [("info", True)] * 3
    assert not [e for e in changes if e["log_level"] == "warning"]


def change(sub: str, new: str, old: str = "ACTIVE") -> StatusChange:
    return StatusChange(sub, ORG, "ops@example.com", "https://example.com/hook", old, new, "test")  # type: ignore[arg-type]


async def test_repeat_after_counts_per_subscription_and_disabled_is_always_noticed(
    mailbox: Mailbox,
) -> None:
    now = [0.0]
    smtp = SmtpConfig(host="127.0.0.1", port=mailbox.port, repeat_after=10.0)
    notifier = Notifier(smtp, clock=lambda: now[0])
    # (time, subscription, new status) -> mailed?
    table = [
        (0.0, "a", "FAILING", True),
        (1.0, "b", "FAILING", True),  # another subscription: its own interval
        (5.0, "a", "FAILING", False),
        (9.9, "a", "FAILING", False),
        (10.0, "a", "FAILING", True),  # repeat_after has passed
        (11.0, "a", "DISABLED", True),  # always
        (12.0, "a", "FAILING", True),  # re-enabled after DISABLED: news again
        (12.5, "a", "DISABLED", True),
    ]
    with capture_logs() as logs:
        for at, sub, new, _ in table:
            now[0] = at
            notifier.notify(change(sub, new))
        await notifier.drain()
    mailed = [(at, sub, new) for at, sub, new, m in table if m]
    assert len(mailbox.mails()) == len(mailed)
    got = sorted((m["Subject"].split()[2], m["Subject"].split()[-1]) for _, _, m in mailbox.mails())
    assert got == sorted((sub, new) for _, sub, new in mailed)
    repeats = [e for e in logs if e["event"] == "subscription_status_changed"]
    assert [e["log_level"] for e in repeats] == ["info", "info"]


async def test_without_smtp_the_first_failing_is_a_warning_and_repeats_are_info() -> None:
    notifier = Notifier(SmtpConfig(), clock=lambda: 0.0)
    with capture_logs() as logs:
        for new in ("FAILING", "FAILING", "DISABLED", "FAILING"):
            notifier.notify(change("a", new))
    assert [(e["new"], e["log_level"]) for e in logs] == [
        ("FAILING", "warning"),
        ("FAILING", "info"),
        ("DISABLED", "warning"),
        ("FAILING", "warning"),
    ]


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
