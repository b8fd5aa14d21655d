"""Prometheus metrics, kept in a registry of the running app (no module globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from pusherd.store.models import QueueStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Every metric pusherd exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events_ingested = Counter(
            "pusherd_events_ingested", "Events accepted on the ingest listener.", registry=r
        )
        self.attempts = Counter(
            "pusherd_delivery_attempts",
            "Delivery attempts by outcome (success, http_error, network_error, timeout).",
            ["outcome"],
            registry=r,
        )
        self.finished = Counter(
            "pusherd_deliveries_finished",
            "Deliveries that reached a final state.",
            ["status"],
            registry=r,
        )
        self.attempt_duration = Histogram(
            "pusherd_attempt_duration_seconds",
            "Duration of delivery attempts.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.queue_depth = Gauge("pusherd_queue_depth", "Pending deliveries.", registry=r)
        self.oldest_pending_age = Gauge(
            "pusherd_oldest_pending_age_seconds",
            "Age of the oldest delivery not yet delivered or failed.",
            registry=r,
        )
        self.in_flight = Gauge(
            "pusherd_destination_in_flight",
            "Attempts under way per destination origin.",
            ["origin"],
            registry=r,
        )
        self.circuit_open = Gauge(
            "pusherd_circuit_open",
            "1 while the origin's circuit breaker is open.",
            ["origin"],
            registry=r,
        )
        for outcome in ("success", "http_error", "network_error", "timeout"):
            self.attempts.labels(outcome=outcome)
        for status in ("delivered", "failed"):
            self.finished.labels(status=status)

    def forget_origin(self, origin: str) -> None:
        """Remove an origin's series (no subscription points at it any more)."""
        self.in_flight.remove(origin)
        self.circuit_open.remove(origin)

    def render(self, stats: QueueStats) -> bytes:
        """The text exposition, with queue gauges refreshed from `stats`."""
        self.queue_depth.set(stats.pending)
        self.oldest_pending_age.set(stats.oldest_pending_age_s)
        return generate_latest(self.registry)
