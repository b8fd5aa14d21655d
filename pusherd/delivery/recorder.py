"""Recording one attempt: the retry decision, the store write, metrics and the log line."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from pusherd.clock import now_ms
from pusherd.delivery.retry import Outcome, RetryPolicy
from pusherd.log import info_enabled
from pusherd.metrics import Metrics
from pusherd.store import Store
from pusherd.store.types import AttemptRecord, ClaimedDelivery, StatusChange

log = structlog.get_logger("pusherd.delivery")


class Recorder:
    """Turns an attempt's outcome into its record and the delivery's next state."""

    def __init__(
        self,
        store: Store,
        owner: str,
        policy: RetryPolicy,
        metrics: Metrics,
        disable_after_ms: int,
        on_status_change: Callable[[StatusChange], None],
    ) -> None:
        self.store = store
        self.owner = owner
        self.policy = policy
        self.disable_after_ms = disable_after_ms
        self.on_status_change = on_status_change
        # Labelled metric children looked up once: labels() is costly on the hot path.
        self._finished = {s: metrics.finished.labels(status=s) for s in ("delivered", "failed")}

    async def record(self, d: ClaimedDelivery, outcome: Outcome, started: int) -> None:
        """Decide (delivered, retry, failed, gone), write it durably, count and log it."""
        decision = self.policy.decide(d.schedule_pos + 1, outcome, now_ms())
        record = AttemptRecord(
            started_ms=started,
            duration_ms=round(outcome.duration_ms, 3),
            status_code=outcome.status_code,
            error=outcome.error,
            response_body=outcome.body,
        )
        change = await self.store.record_attempt(
            d, self.owner, record, decision.kind, decision.next_attempt_ms, self.disable_after_ms
        )
        if decision.kind == "delivered":
            self._finished["delivered"].inc()
        elif decision.kind in ("failed", "gone"):
            self._finished["failed"].inc()
        if info_enabled():
            log.info(
                "delivery_attempted",
                delivery_id=d.id,
                subscription=d.subscription,
                event_name=d.event_name,
                attempt=d.attempts + 1,
                status_code=outcome.status_code,
                error=outcome.error,
                duration_ms=round(outcome.duration_ms, 1),
                result=decision.kind,
            )
        if change is not None:
            self.on_status_change(change)
