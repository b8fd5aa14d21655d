"""contactEmail notices when a subscription turns FAILING or DISABLED (SMTP, or a log line)."""

from __future__ import annotations

import asyncio
import smtplib
from email.message import EmailMessage

import structlog

from pusherd.config import SmtpConfig
from pusherd.store.types import StatusChange

log = structlog.get_logger("pusherd.notify")


def compose(change: StatusChange, sender: str) -> EmailMessage:
    """The mail for one status change."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = change.contact_email or ""
    msg["Subject"] = f"pusherd: subscription {change.subscription} is now {change.new}"
    msg.set_content(
        f"Your webhook subscription {change.subscription} changed from {change.old} to "
        f"{change.new}: {change.reason}.\n\n"
        f"Destination: {change.destination}\n\n"
        + (
            "No more deliveries are sent to it. Fix the receiver, then set its status back to "
            "ACTIVE (PUT the subscription with status ACTIVE, or isActive true).\n"
            if change.new == "DISABLED"
            else "Deliveries are being retried with backoff.\n"
        )
    )
    return msg


class Notifier:
    """Sends one mail per status change to FAILING or DISABLED, in the background."""

    def __init__(self, smtp: SmtpConfig) -> None:
        self.smtp = smtp
        self._tasks: set[asyncio.Task[None]] = set()

    def notify(self, change: StatusChange) -> None:
        """Mail (or log) a change; returns at once."""
        if change.new not in ("FAILING", "DISABLED"):
            log.info(
                "subscription_status_changed",
                subscription=change.subscription,
                old=change.old,
                new=change.new,
            )
            return
        if not self.smtp.host or not change.contact_email:
            log.warning(
                "subscription_status_changed",
                subscription=change.subscription,
                old=change.old,
                new=change.new,
                reason=change.reason,
                contact_email=change.contact_email,
                mailed=False,
            )
            return
        task = asyncio.get_running_loop().create_task(self._send(change))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, change: StatusChange) -> None:
        msg = compose(change, self.smtp.from_)
        try:
            await asyncio.to_thread(self._deliver, msg)
        except (OSError, smtplib.SMTPException) as exc:
            log.error("notice_mail_failed", subscription=change.subscription, error=str(exc))
            return
        log.info(
            "notice_mailed",
            subscription=change.subscription,
            new=change.new,
            to=change.contact_email,
        )

    def _deliver(self, msg: EmailMessage) -> None:
        with smtplib.SMTP(self.smtp.host, self.smtp.port, timeout=self.smtp.timeout) as client:
            if self.smtp.starttls:
                client.starttls()
            if self.smtp.username:
                client.login(self.smtp.username, self.smtp.password)
            client.send_message(msg)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) for mails still being sent."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
