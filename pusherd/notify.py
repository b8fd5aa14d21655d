"""contactEmail notices when a subscription turns FAILING or DISABLED (SMTP, or a log line).

A subscription that flaps between ACTIVE and FAILING is not a mail storm: it gets at most one
FAILING notice per `smtp.repeat_after`; the repeats are logged at info level. Every change to
DISABLED is a notice. What was noticed when lives in memory (a restart may notice once more).
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Callable
from email.message import EmailMessage

import structlog

from pusherd.config import SmtpConfig
from pusherd.store.models import StatusChange

log = structlog.get_logger("pusherd.notify")
PRUNE_MIN = 1024  # entries of the FAILING-notice table before it is swept of expired ones


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
    """Sends one mail per status change to FAILING (debounced) or DISABLED, in the background."""

    def __init__(self, smtp: SmtpConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.smtp = smtp
        self.clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        # subscription -> when its last FAILING notice went out
        self._failing_noticed: dict[str, float] = {}
        self._prune_at = PRUNE_MIN

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
        if self._repeated(change):
            log.info(
                "subscription_status_changed",
                subscription=change.subscription,
                old=change.old,
                new=change.new,
                reason=change.reason,
                mailed=False,
                repeated=True,  # noticed less than repeat_after ago
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

    def _repeated(self, change: StatusChange) -> bool:
        """A FAILING change within repeat_after of the last noticed one; notes a new notice."""
        sub, now = change.subscription, self.clock()
        if change.new == "DISABLED":
            self._failing_noticed.pop(sub, None)  # a later FAILING is news again
            return False
        last = self._failing_noticed.get(sub)
        if last is not None and now - last < self.smtp.repeat_after:
            return True
        self._failing_noticed[sub] = now
        if len(self._failing_noticed) >= self._prune_at:
            # Bounded by the subscriptions noticed within repeat_after, not all that ever were.
            self._failing_noticed = {
                s: t for s, t in self._failing_noticed.items() if now - t < self.smtp.repeat_after
            }
            self._prune_at = max(PRUNE_MIN, 2 * len(self._failing_noticed))
        return False

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
