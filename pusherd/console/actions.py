"""The console's actions: each runs the API's own function (pusherd.api.subscriptions).

Actions that send traffic (retry, replay, test) first show a confirmation page whose form posts;
every action answers with a message saying what it did.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from pusherd.api import subscriptions as subs
from pusherd.clock import iso_ms
from pusherd.console.pages import delivery_id, parse_when, subscription_or_404
from pusherd.console.render import render
from pusherd.console.session import PREFIX, see_other, session_of
from pusherd.keys import RUNTIME
from pusherd.store.types import SubscriptionChanges

TEST_EVENT_DEFAULT = "test.event"


def _confirm(
    request: web.Request, title: str, message: str, fields: dict[str, str], back: str
) -> web.Response:
    context: dict[str, Any] = {
        "title": title,
        "message": message,
        "action": request.path,
        "fields": fields,
        "back": back,
    }
    return render(request, "confirm.html", context)


def _done(request: web.Request, message: str, location: str) -> web.Response:
    session_of(request).flash.append(message)
    return see_other(location)


def _refused(exc: subs.Refused) -> web.HTTPException:
    if exc.status == 404:
        return web.HTTPNotFound(reason=exc.message)
    return web.HTTPConflict(reason=exc.message)


async def _delivery_org(request: web.Request) -> tuple[int, str]:
    did = delivery_id(request.match_info["id"])
    d = await request.app[RUNTIME].store.console.delivery(session_of(request).organization, did)
    if d is None:
        raise web.HTTPNotFound(reason="no such delivery")
    return did, d.organization


async def retry(request: web.Request) -> web.Response:
    """GET: confirm; POST: queue a finished delivery again (as POST .../events/{id}/retry)."""
    did, org = await _delivery_org(request)
    back = f"{PREFIX}/deliveries/{did}"
    if request.method == "GET":
        return _confirm(
            request, "Retry delivery", f"Send delivery #{did} to its destination again?", {}, back
        )
    try:
        await subs.retry_delivery(request.app[RUNTIME], org, did)
    except subs.Refused as exc:
        raise _refused(exc) from None
    return _done(request, f"Delivery #{did} was queued for another attempt.", back)


async def replay(request: web.Request) -> web.Response:
    """GET: confirm; POST: queue the subscription's failed deliveries since a time again."""
    sub = await subscription_or_404(request, request.match_info["uuid"])
    back = f"{PREFIX}/subscriptions/{sub.uuid}"
    form = request.query if request.method == "GET" else await request.post()
    raw = form.get("since", "")
    since_text = raw if isinstance(raw, str) else ""
    since_ms = parse_when(since_text, "since")
    what = f"since {iso_ms(since_ms)}" if since_ms is not None else "of any age"
    if request.method == "GET":
        return _confirm(
            request,
            "Replay failed deliveries",
            f"Send every failed delivery {what} to {sub.destination} again?",
            {"since": since_text},
            back,
        )
    try:
        queued = await subs.replay_failed(request.app[RUNTIME], sub, since_ms)
    except subs.Refused as exc:
        raise _refused(exc) from None
    return _done(request, f"{queued} failed deliveries {what} were queued again.", back)


async def send_test(request: web.Request) -> web.Response:
    """GET: confirm; POST: one test event to this subscription (as POST /api/webhooks/{id}/test)."""
    sub = await subscription_or_404(request, request.match_info["uuid"])
    back = f"{PREFIX}/subscriptions/{sub.uuid}"
    if request.method == "GET":
        return _confirm(
            request,
            "Send a test event",
            f'Send a "{TEST_EVENT_DEFAULT}" event with payload {{"test": true}}'
            f" to {sub.destination}?",
            {},
            back,
        )
    try:
        sent = await subs.send_test(
            request.app[RUNTIME], sub.organization, TEST_EVENT_DEFAULT, [sub]
        )
    except subs.Refused as exc:
        raise _refused(exc) from None
    return _done(request, f"A test event was queued as delivery #{sent[0][1]}.", back)


async def enable(request: web.Request) -> web.Response:
    """POST: set a DISABLED subscription ACTIVE again (as PUT with status ACTIVE)."""
    sub = await subscription_or_404(request, request.match_info["uuid"])
    back = f"{PREFIX}/subscriptions/{sub.uuid}"
    changes = SubscriptionChanges(status="ACTIVE")
    if await subs.apply_changes(request.app[RUNTIME], sub.organization, sub.uuid, changes) is None:
        raise web.HTTPNotFound(reason="no such subscription")
    return _done(request, "The subscription is ACTIVE again; new events go out to it.", back)


async def rotate(request: web.Request) -> web.Response:
    """POST: a new signing key (as POST /api/webhooks/generate-secret), shown this once."""
    sub = await subscription_or_404(request, request.match_info["uuid"])
    try:
        secret = await subs.rotate_key(request.app[RUNTIME], sub)
    except subs.Refused as exc:
        raise _refused(exc) from None
    return render(request, "rotated.html", {"sub": sub, "secret": secret})


def add_routes(app: web.Application) -> None:
    """Register the action routes."""
    r = app.router
    for path, handler in (
        ("/deliveries/{id}/retry", retry),
        ("/subscriptions/{uuid}/replay", replay),
        ("/subscriptions/{uuid}/test", send_test),
    ):
        r.add_get(path, handler, allow_head=False)
        r.add_post(path, handler)
    r.add_post("/subscriptions/{uuid}/enable", enable)
    r.add_post("/subscriptions/{uuid}/rotate", rotate)
