"""The console's pages: overview, subscriptions, a subscription's delivery log, one delivery."""

from __future__ import annotations

import uuid as uuidlib
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from pusherd.clock import now_ms
from pusherd.console.charts import minute_chart
from pusherd.console.present import sent
from pusherd.console.render import render
from pusherd.console.rollup import Rollup
from pusherd.console.session import Session, session_of
from pusherd.keys import RUNTIME
from pusherd.store.console import ConsoleStore, LogFilter, SubscriptionCounts
from pusherd.store.types import Subscription
from pusherd.units import parse_duration

MINUTE_MS = 60_000
HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS
LOG_PAGE = 50
LOG_STATUSES = ("pending", "delivered", "failed")
HOUR: web.AppKey[Rollup] = web.AppKey("console_hour", Rollup)  # 1-minute buckets
DAY: web.AppKey[Rollup] = web.AppKey("console_day", Rollup)  # 10-minute buckets


def parse_uuid(value: str) -> str | None:
    """A canonical UUID, or None."""
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        return None


def scope(request: web.Request, session: Session) -> str | None:
    """The organization a page shows: the session's, or for an ADMIN `?org=` (None: all)."""
    if not session.admin:
        return session.organization
    raw = request.query.get("org", "")
    if not raw:
        return None
    org = parse_uuid(raw)
    if org is None:
        raise web.HTTPBadRequest(reason="org must be an organization UUID")
    return org


def parse_when(text: str, field: str) -> int | None:
    """A time from a form: a duration ago ("2h", "30m") or a date-time (UTC unless it says)."""
    text = text.strip()
    if not text:
        return None
    try:
        return now_ms() - int(parse_duration(text) * 1000)
    except ValueError:
        pass
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise web.HTTPBadRequest(
            reason=f"{field}: expected a date and time (UTC) or a duration such as 2h"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


async def subscription_or_404(request: web.Request, raw: str) -> Subscription:
    """A subscription the session may see, or 404 (another organization's looks the same)."""
    sub_uuid = parse_uuid(raw)
    sub = None
    if sub_uuid is not None:
        console = request.app[RUNTIME].store.console
        sub = await console.subscription(session_of(request).organization, sub_uuid)
    if sub is None:
        raise web.HTTPNotFound(reason="no such subscription")
    return sub


def delivery_id(raw: str) -> int:
    """A delivery id from a path, or 404."""
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) < 2**63:
        raise web.HTTPNotFound(reason="no such delivery")
    return int(raw)


def _rows(subs: list[Subscription], counts: dict[str, SubscriptionCounts]) -> list[Any]:
    return [(s, counts.get(s.uuid, SubscriptionCounts())) for s in subs]


async def overview(request: web.Request) -> web.Response:
    """GET /console/: charts, latency, queue, and the subscriptions that need attention first."""
    session = session_of(request)
    org = scope(request, session)
    console = request.app[RUNTIME].store.console
    now = now_ms()
    subs = await console.subscriptions(org)
    scope_subs = None if org is None else {s.uuid for s in subs}
    hour = await request.app[HOUR].window(scope_subs)
    day = await request.app[DAY].window(scope_subs)
    hour_chart = minute_chart("Last hour", hour.buckets, 10 * MINUTE_MS)
    day_chart = minute_chart(
        "Last 24 hours", day.buckets, 3 * HOUR_MS, request.app[DAY].bucket_ms // MINUTE_MS
    )
    latency = await console.latency(org, now - HOUR_MS)
    queue = await console.queue(org)
    counts = day.by_subscription
    return render(
        request,
        "overview.html",
        {
            "org": org,
            "charts": [hour_chart, day_chart],
            "latency": latency,
            "queue": queue,
            "rows": _rows(subs, counts),
            "attention": sum(1 for s in subs if s.status != "ACTIVE"),
        },
    )


async def subscriptions(request: web.Request) -> web.Response:
    """GET /console/subscriptions: status, destination, events, 24h counts and success rate."""
    session = session_of(request)
    org = scope(request, session)
    console = request.app[RUNTIME].store.console
    subs = await console.subscriptions(org)
    day = await request.app[DAY].window(None if org is None else {s.uuid for s in subs})
    counts = day.by_subscription
    return render(request, "subscriptions.html", {"org": org, "rows": _rows(subs, counts)})


async def subscription(request: web.Request) -> web.Response:
    """GET /console/subscriptions/{uuid}: its actions and its delivery log, filtered and paged."""
    sub = await subscription_or_404(request, request.match_info["uuid"])
    q = request.query
    status = q.get("status", "")
    if status and status not in LOG_STATUSES:
        raise web.HTTPBadRequest(reason="status must be pending, delivered or failed")
    event = q.get("event", "").strip()
    if "\x00" in event:  # no event name has one, and PostgreSQL text cannot hold it
        raise web.HTTPBadRequest(reason="event must be an event name")
    before = q.get("before", "")
    flt = LogFilter(
        status=status or None,
        event_name=event or None,
        since_ms=parse_when(q.get("since", ""), "since"),
        until_ms=parse_when(q.get("until", ""), "until"),
        before_id=delivery_id(before) if before else None,
    )
    console = request.app[RUNTIME].store.console
    page = await console.log_page(sub.uuid, flt, LOG_PAGE)
    counts = (await request.app[DAY].window({sub.uuid})).by_subscription
    filters = {
        "status": status,
        "event": event,
        "since": q.get("since", ""),
        "until": q.get("until", ""),
    }
    older = None
    if page.next_before_id is not None:
        older = {**{k: v for k, v in filters.items() if v}, "before": str(page.next_before_id)}
    return render(
        request,
        "subscription.html",
        {
            "sub": sub,
            "counts": counts.get(sub.uuid, SubscriptionCounts()),
            "page": page,
            "filters": filters,
            "statuses": LOG_STATUSES,
            "older": older,
            "event_names": sorted({*sub.event_names, "TestMessage", "test.event"}),
        },
    )


async def delivery(request: web.Request) -> web.Response:
    """GET /console/deliveries/{id}: envelope, headers sent and every attempt."""
    did = delivery_id(request.match_info["id"])
    console = request.app[RUNTIME].store.console
    d = await console.delivery(session_of(request).organization, did)
    if d is None:
        raise web.HTTPNotFound(reason="no such delivery")
    return render(request, "delivery.html", {"d": d, "sent": sent(d)})


def add_routes(app: web.Application) -> None:
    """Register the page routes (and the counts they share)."""
    runtime = app[RUNTIME]

    def store() -> ConsoleStore:
        return runtime.store.console

    app[HOUR] = Rollup(store, MINUTE_MS, HOUR_MS)
    app[DAY] = Rollup(store, 10 * MINUTE_MS, DAY_MS)
    r = app.router
    r.add_get("/", overview, allow_head=False)
    r.add_get("/subscriptions", subscriptions, allow_head=False)
    r.add_get("/subscriptions/{uuid}", subscription, allow_head=False)
    r.add_get("/deliveries/{id}", delivery, allow_head=False)
