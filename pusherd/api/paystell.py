"""PayStell dialect: /api/webhooks/... (SPEC §4).

Same subscriptions as the Zettle dialect under other names (id=uuid, url=destination,
eventTypes=eventNames, isActive=status != DISABLED, secretKey=signingKey). A PayStell "event" is one
delivery; its id is the delivery's integer id, shown as a string. Invalid input is 400 here.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from typing import Any

from aiohttp import web

from pusherd.api import routes
from pusherd.api import subscriptions as subs
from pusherd.api.errors import ApiError, json_response, read_json
from pusherd.clock import iso_ms, iso_or_none
from pusherd.keys import RUNTIME, request_token
from pusherd.runtime import Runtime
from pusherd.store.types import (
    AttemptRecord,
    DeliveryView,
    Subscription,
    SubscriptionChanges,
)

SECRET_MIN = 32
SECRET_MAX = 512
TEST_EVENT_DEFAULT = "test.event"
TEST_EVENT_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
EVENT_STATUSES = frozenset({"pending", "delivered", "failed"})
LIMIT_DEFAULT = 50
LIMIT_MAX = 200
MAX_DELIVERY_ID = 2**63 - 1


def webhook_json(sub: Subscription, *, secret: bool = False) -> dict[str, Any]:
    """A subscription as the PayStell API shows it (the secret only when asked for)."""
    out: dict[str, Any] = {
        "id": sub.uuid,
        "url": sub.destination,
        "eventTypes": list(sub.event_names),
        "isActive": sub.status != "DISABLED",
        "contactEmail": sub.contact_email,
        "createdAt": iso_ms(sub.created_ms),
        "updatedAt": iso_ms(sub.updated_ms),
    }
    if secret:
        out["secretKey"] = sub.signing_key
    return out


def _attempt_json(a: AttemptRecord) -> dict[str, Any]:
    return {
        "startedAt": iso_ms(a.started_ms),
        "durationMs": a.duration_ms,
        "statusCode": a.status_code,
        "error": a.error,
        "responseBody": a.response_body,
    }


def event_json(d: DeliveryView, *, attempts: bool = False) -> dict[str, Any]:
    """A delivery as a PayStell "event"."""
    # Only deleted webhooks have cancelled deliveries, and those are never shown; should one
    # surface anyway, it did not arrive, which is what "failed" tells a client.
    status = "failed" if d.status == "cancelled" else d.status
    out: dict[str, Any] = {
        "id": str(d.id),
        "webhookId": d.subscription,
        "eventType": d.event_name,
        "status": status,
        "attempts": d.attempts,
        "createdAt": iso_ms(d.created_ms),
        "deliveredAt": iso_or_none(d.finished_ms) if status == "delivered" else None,
        "lastStatusCode": d.last_status_code,
        "lastError": d.last_error,
        "nextAttemptAt": iso_or_none(d.due_ms) if status == "pending" else None,
    }
    if attempts:
        out["attemptLog"] = [_attempt_json(a) for a in d.attempt_log]
    return out


def success(data: Any = None, message: str | None = None, status: int = 200) -> web.Response:
    """The PayStell success envelope."""
    body: dict[str, Any] = {"status": "success"}
    if message is not None:
        body["message"] = message
    if data is not None:
        body["data"] = data
    return json_response(body, status)


async def _body(request: web.Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _webhook_id(value: str) -> str:
    """A canonical UUID; anything else cannot name a webhook, so it is 404."""
    try:
        return subs.parse_uuid(value, "id")
    except subs.FieldError:
        raise ApiError(404, "no such webhook") from None


async def _by_id(runtime: Runtime, org: str, value: str) -> Subscription:
    sub = await runtime.store.get_subscription(org, _webhook_id(value))
    if sub is None:
        raise ApiError(404, "no such webhook")
    return sub


async def _chosen(request: web.Request, *, none_ok: bool = False) -> Subscription | None:
    """The webhook `?id=` names, or the organization's only one (409 when there are several)."""
    runtime = request.app[RUNTIME]
    org = request_token(request).organization
    if "id" in request.query:
        return await _by_id(runtime, org, request.query["id"])
    hooks = await runtime.store.list_subscriptions(org)
    if len(hooks) > 1:
        raise ApiError(
            409, f"this organization has {len(hooks)} webhooks; say which one with ?id=UUID"
        )
    if not hooks:
        if none_ok:
            return None
        raise ApiError(404, "no webhook registered")
    return hooks[0]


async def _chosen_one(request: web.Request) -> Subscription:
    sub = await _chosen(request)
    assert sub is not None
    return sub


def _delivery_id(request: web.Request) -> int:
    raw = request.match_info["eventId"]
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) <= MAX_DELIVERY_ID:
        raise ApiError(404, "no such event")
    return int(raw)


async def register(request: web.Request) -> web.Response:
    """POST /api/webhooks/register: create a webhook (201, secretKey shown this once)."""
    runtime = request.app[RUNTIME]
    token = request_token(request)
    f = await _body(request)
    try:
        if f.get("url") is None:
            raise subs.FieldError("url", "url is required")
        if f.get("eventTypes") is None:
            raise subs.FieldError("eventTypes", "eventTypes is required")
        names = subs.parse_event_names(f["eventTypes"], runtime.catalogue, "eventTypes")
        email = None
        if f.get("contactEmail") is not None:
            email = subs.parse_email(f["contactEmail"])
        secret = f.get("secretKey")
        if secret is not None and (
            not isinstance(secret, str)
            or not SECRET_MIN <= len(secret) <= SECRET_MAX
            or "\x00" in secret  # PostgreSQL text cannot hold it
        ):
            raise subs.FieldError(
                "secretKey",
                f"secretKey must be a string of {SECRET_MIN} to {SECRET_MAX} characters (no NUL)",
            )
        subs.check_scopes(names, token, runtime.catalogue)
        url = await subs.parse_destination(f["url"], runtime.config.delivery, "url")
    except subs.FieldError as exc:
        raise ApiError(400, exc.message) from None
    except subs.ScopeError as exc:
        raise ApiError(403, str(exc)) from None
    sub = await subs.create(
        runtime,
        token,
        sub_uuid=str(uuidlib.uuid4()),
        event_names=names,
        destination=url,
        contact_email=email,
        signing_key=secret,
    )
    return success(webhook_json(sub, secret=True), "Webhook registered successfully", 201)


async def update(request: web.Request) -> web.Response:
    """PUT /api/webhooks/register: change url, eventTypes, isActive, contactEmail."""
    runtime = request.app[RUNTIME]
    token = request_token(request)
    f = await _body(request)
    sub = await _chosen_one(request)
    try:
        names = None
        if "eventTypes" in f:
            names = subs.parse_event_names(f["eventTypes"], runtime.catalogue, "eventTypes")
        status: Any = None
        if "isActive" in f:
            if not isinstance(f["isActive"], bool):
                raise subs.FieldError("isActive", "isActive must be true or false")
            status = "ACTIVE" if f["isActive"] else "DISABLED"
        email = None
        if "contactEmail" in f:
            email = subs.parse_email(f["contactEmail"])
        if names is not None:
            subs.check_scopes(names, token, runtime.catalogue)
        url = None
        if "url" in f:
            url = await subs.parse_destination(f["url"], runtime.config.delivery, "url")
    except subs.FieldError as exc:
        raise ApiError(400, exc.message) from None
    except subs.ScopeError as exc:
        raise ApiError(403, str(exc)) from None
    changes = SubscriptionChanges(
        event_names=names, destination=url, contact_email=email, status=status
    )
    updated = await subs.update(runtime, token, sub.uuid, changes)
    if updated is None:
        raise ApiError(404, "no such webhook")
    return success(webhook_json(updated), "Webhook updated successfully")


async def get_one(request: web.Request) -> web.Response:
    """GET /api/webhooks/register: the webhook."""
    return success(webhook_json(await _chosen_one(request)))


async def delete(request: web.Request) -> web.Response:
    """DELETE /api/webhooks/register: remove it and cancel its pending deliveries."""
    runtime = request.app[RUNTIME]
    sub = await _chosen_one(request)
    if not await subs.delete(runtime, sub.organization, sub.uuid):
        raise ApiError(404, "no such webhook")
    return success(message="Webhook deleted successfully")


async def list_all(request: web.Request) -> web.Response:
    """GET /api/webhooks: every webhook of the organization."""
    runtime = request.app[RUNTIME]
    org = request_token(request).organization
    return success([webhook_json(s) for s in await runtime.store.list_subscriptions(org)])


async def generate_secret(request: web.Request) -> web.Response:
    """POST /api/webhooks/generate-secret: a new secret, made the webhook's signing key."""
    runtime = request.app[RUNTIME]
    sub = await _chosen(request, none_ok=True)
    secret = subs.new_signing_key()
    if sub is None:
        return success(
            {"secret": secret, "webhookId": None},
            "Secret generated; no webhook is registered, so it was not applied",
        )
    try:
        await subs.rotate_key(runtime, sub, secret)
    except subs.Refused as exc:
        raise ApiError(exc.status, exc.message) from None
    return success(
        {"secret": secret, "webhookId": sub.uuid},
        "Secret generated; the previous one keeps signing alongside it for 24 hours",
    )


async def _test_event_name(request: web.Request) -> str:
    f = await _body(request)
    name = f.get("eventType")
    if name is None:
        return TEST_EVENT_DEFAULT
    if not isinstance(name, str) or not TEST_EVENT_RE.match(name):
        raise ApiError(400, "eventType must match [A-Za-z0-9._-]{1,100}")
    return name


async def _send_test(
    runtime: Runtime, org: str, name: str, targets: list[Subscription]
) -> web.Response:
    try:
        sent = await subs.send_test(runtime, org, name, targets)
    except subs.Refused as exc:
        raise ApiError(exc.status, exc.message) from None
    events = [{"webhookId": w, "eventId": str(i)} for w, i in sent]
    return success(
        {"eventId": events[0]["eventId"], "events": events}, "Test webhook sent successfully"
    )


async def test_all(request: web.Request) -> web.Response:
    """POST /api/webhooks/test: one test message to every active webhook."""
    runtime = request.app[RUNTIME]
    org = request_token(request).organization
    name = await _test_event_name(request)
    targets = [s for s in await runtime.store.list_subscriptions(org) if s.status != "DISABLED"]
    if not targets:
        raise ApiError(404, "no active webhook to send a test to")
    return await _send_test(runtime, org, name, targets)


async def test_one(request: web.Request) -> web.Response:
    """POST /api/webhooks/{id}/test: one test message to that webhook."""
    runtime = request.app[RUNTIME]
    org = request_token(request).organization
    sub = await _by_id(runtime, org, request.match_info["id"])
    name = await _test_event_name(request)
    return await _send_test(runtime, org, name, [sub])


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}")
    return int(raw)


async def list_events(request: web.Request) -> web.Response:
    """GET /api/webhooks/{id}/events: its deliveries, newest first, cursor-paginated."""
    runtime = request.app[RUNTIME]
    org = request_token(request).organization
    sub = await _by_id(runtime, org, request.match_info["id"])
    status = request.query.get("status")
    if status is not None and status not in EVENT_STATUSES:
        raise ApiError(400, "status must be one of pending, delivered, failed")
    limit = _query_int(request, "limit", LIMIT_DEFAULT, 1, LIMIT_MAX)
    cursor = None
    if "cursor" in request.query:
        cursor = _query_int(request, "cursor", 0, 1, MAX_DELIVERY_ID)
    rows = await runtime.store.list_deliveries(sub.uuid, status, limit + 1, cursor)
    page = rows[:limit]
    next_cursor = str(page[-1].id) if len(rows) > limit else None
    return success({"events": [event_json(d) for d in page], "nextCursor": next_cursor})


async def get_event(request: web.Request) -> web.Response:
    """GET /api/webhooks/events/{eventId}: one delivery with every attempt."""
    runtime = request.app[RUNTIME]
    org = request_token(request).organization
    d = await runtime.store.get_delivery(_delivery_id(request), org)
    if d is None:
        raise ApiError(404, "no such event")
    return success(event_json(d, attempts=True))


async def retry_event(request: web.Request) -> web.Response:
    """POST /api/webhooks/events/{eventId}/retry: queue a finished delivery again (202)."""
    runtime = request.app[RUNTIME]
    org = request_token(request).organization
    delivery_id = _delivery_id(request)
    try:
        await subs.retry_delivery(runtime, org, delivery_id)
    except subs.Refused as exc:
        raise ApiError(exc.status, exc.message) from None
    return success(
        {"jobId": str(delivery_id), "status": "pending"}, "Webhook queued for retry", 202
    )


async def metrics(request: web.Request) -> web.Response:
    """GET /api/webhooks/metrics: delivery totals of the organization or of one webhook."""
    runtime = request.app[RUNTIME]
    org = request_token(request).organization
    if "id" in request.query:
        uuids = [(await _by_id(runtime, org, request.query["id"])).uuid]
    else:
        uuids = [s.uuid for s in await runtime.store.list_subscriptions(org)]
    c = await runtime.store.delivery_counts(uuids)
    finished = c.delivered + c.failed
    rate = round(c.delivered / finished * 100, 2) if finished else 0
    return success(
        {
            "total": c.total,
            "delivered": c.delivered,
            "failed": c.failed,
            "pending": c.pending,
            "deliveryRate": rate,
        }
    )


def add_routes(app: web.Application) -> None:
    """Register the PayStell routes (fixed paths before the /{id}/... patterns); GET and DELETE
    never read a body."""
    base = "/api/webhooks"
    routes.add(app, base, {"GET": list_all})
    routes.add(
        app, base + "/register", {"POST": register, "PUT": update, "GET": get_one, "DELETE": delete}
    )
    routes.add(app, base + "/generate-secret", {"POST": generate_secret})
    routes.add(app, base + "/test", {"POST": test_all})
    routes.add(app, base + "/metrics", {"GET": metrics})
    routes.add(app, base + "/events/{eventId}", {"GET": get_event})
    routes.add(app, base + "/events/{eventId}/retry", {"POST": retry_event})
    routes.add(app, base + "/{id}/test", {"POST": test_one})
    routes.add(app, base + "/{id}/events", {"GET": list_events})
