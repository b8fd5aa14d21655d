"""Zettle Pusher dialect: /organizations/{organizationUuid}/subscriptions (SPEC §3)."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from pusherd.api import routes
from pusherd.api import subscriptions as subs
from pusherd.api.errors import ApiError, json_response, read_json
from pusherd.auth import resolve_org
from pusherd.clock import iso_ms
from pusherd.keys import RUNTIME, request_token
from pusherd.store import UuidTakenError
from pusherd.store.types import Subscription, SubscriptionChanges

UNPROCESSABLE_FIELDS = frozenset({"destination", "contactEmail"})
ARRAY_FIELDS = frozenset({"eventNames"})
_MISSING = object()


def to_json(sub: Subscription) -> dict[str, Any]:
    """A subscription as the Zettle API shows it."""
    return {
        "uuid": sub.uuid,
        "transportName": sub.transport,
        "eventNames": list(sub.event_names),
        "updated": iso_ms(sub.updated_ms),
        "destination": sub.destination,
        "contactEmail": sub.contact_email,
        "status": sub.status,
        "signingKey": sub.signing_key,
    }


def _field_error(exc: subs.FieldError) -> ApiError:
    return ApiError(422 if exc.field in UNPROCESSABLE_FIELDS else 400, exc.message)


# PHP's http_build_query and JavaScript's qs write an array as `eventNames[]=A&eventNames[]=B` or
# `eventNames[0]=A&eventNames[1]=B`: read those as the repeated parameter they stand for.
_BRACKETED = re.compile(r"^(\w+)\[\d*\]$")


def _query_arrays(request: web.Request) -> dict[str, list[str]]:
    """Each array field's values from the query, in order, whichever way it is spelled."""
    out: dict[str, list[str]] = {}
    for key, value in request.query.items():
        m = _BRACKETED.match(key)
        name = m.group(1) if m else key
        if name in ARRAY_FIELDS:
            out.setdefault(name, []).extend(v for v in value.split(",") if v)
    return out


async def _fields(request: web.Request) -> dict[str, Any]:
    """Body fields, with query parameters filling in what the body does not carry."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    fields = dict(body)
    for key in set(request.query):
        if key not in fields and key not in ARRAY_FIELDS:
            fields[key] = request.query.getall(key)[-1]
    for key, values in _query_arrays(request).items():
        fields.setdefault(key, values)
    return fields


def _sub_uuid(request: web.Request) -> str:
    try:
        return subs.parse_uuid(request.match_info["subscriptionUuid"])
    except subs.FieldError:
        raise ApiError(404, "no such subscription") from None


async def create_subscription(request: web.Request) -> web.Response:
    """POST: create a subscription (200 with it, signingKey included)."""
    runtime = request.app[RUNTIME]
    token = request_token(request)
    resolve_org(request, request.match_info["organizationUuid"])
    f = await _fields(request)
    catalogue = runtime.catalogue
    try:
        for name in ("uuid", "transportName", "eventNames"):
            if f.get(name, _MISSING) is _MISSING or f[name] is None:
                raise subs.FieldError(name, f"{name} is required")
        sub_uuid = subs.parse_uuid(f["uuid"])
        if f["transportName"] != "WEBHOOK":
            raise subs.FieldError("transportName", "transportName must be WEBHOOK")
        names = subs.parse_event_names(f["eventNames"], catalogue)
        for name in ("destination", "contactEmail"):
            if f.get(name) is None:
                raise subs.FieldError(name, f"{name} is required")
        email = subs.parse_email(f["contactEmail"])
        subs.check_scopes(names, token, catalogue)
        destination = await subs.parse_destination(f["destination"], runtime.config.delivery)
        sub = await subs.create(
            runtime,
            token,
            sub_uuid=sub_uuid,
            event_names=names,
            destination=destination,
            contact_email=email,
        )
    except subs.FieldError as exc:
        raise _field_error(exc) from None
    except subs.ScopeError as exc:
        raise ApiError(403, str(exc)) from None
    except UuidTakenError:
        raise ApiError(
            400, "this uuid is already used by a subscription (uuids of deleted ones stay used)"
        ) from None
    return json_response(to_json(sub))


async def list_subscriptions(request: web.Request) -> web.Response:
    """GET: the organization's subscriptions."""
    runtime = request.app[RUNTIME]
    org = resolve_org(request, request.match_info["organizationUuid"])
    return json_response([to_json(s) for s in await runtime.store.list_subscriptions(org)])


async def get_subscription(request: web.Request) -> web.Response:
    """GET one subscription (200 with it; 404 when the organization has none by that uuid)."""
    runtime = request.app[RUNTIME]
    org = resolve_org(request, request.match_info["organizationUuid"])
    sub = await runtime.store.get_subscription(org, _sub_uuid(request))
    if sub is None:
        raise ApiError(404, "no such subscription")
    return json_response(to_json(sub))


async def update_subscription(request: web.Request) -> web.Response:
    """PUT: partial update (200, empty body)."""
    runtime = request.app[RUNTIME]
    token = request_token(request)
    org = resolve_org(request, request.match_info["organizationUuid"])
    sub_uuid = _sub_uuid(request)
    f = await _fields(request)
    if await runtime.store.get_subscription(org, sub_uuid) is None:
        raise ApiError(404, "no such subscription")
    catalogue = runtime.catalogue
    try:
        transport = f.get("transportName")
        if transport is not None and transport != "WEBHOOK":
            raise subs.FieldError("transportName", "transportName must be WEBHOOK")
        names = None
        if f.get("eventNames") is not None:
            names = subs.parse_event_names(f["eventNames"], catalogue)
        status = f.get("status")
        if status is not None and status != "ACTIVE":
            raise subs.FieldError("status", 'status can only be set to "ACTIVE"')
        email = None
        if "contactEmail" in f:
            email = subs.parse_email(f["contactEmail"])
        destination = None
        if "destination" in f:
            destination = f["destination"]
            if not isinstance(destination, str) or not destination.strip():
                raise subs.FieldError("destination", "destination must not be empty")
        if names is not None:
            subs.check_scopes(names, token, catalogue)
        if destination is not None:
            destination = await subs.parse_destination(destination, runtime.config.delivery)
    except subs.FieldError as exc:
        raise _field_error(exc) from None
    except subs.ScopeError as exc:
        raise ApiError(403, str(exc)) from None
    changes = SubscriptionChanges(
        transport=transport,
        event_names=names,
        destination=destination,
        contact_email=email,
        status="ACTIVE" if status == "ACTIVE" else None,
    )
    if await subs.update(runtime, token, sub_uuid, changes) is None:
        raise ApiError(404, "no such subscription")
    return web.Response(status=200)


async def delete_subscription(request: web.Request) -> web.Response:
    """DELETE: remove it and cancel its pending deliveries (204)."""
    runtime = request.app[RUNTIME]
    org = resolve_org(request, request.match_info["organizationUuid"])
    sub_uuid = _sub_uuid(request)
    if not await subs.delete(runtime, org, sub_uuid):
        raise ApiError(404, "no such subscription")
    return web.Response(status=204)


async def delete_without_uuid(request: web.Request) -> web.Response:
    """DELETE on the collection: 404, as seed 000 answers a DELETE without a subscriptionUuid
    (a PUT without one is 405, a wrong method)."""
    resolve_org(request, request.match_info["organizationUuid"])
    raise ApiError(
        404, "no subscription uuid in the path: DELETE /organizations/{org}/subscriptions/{uuid}"
    )


def add_routes(app: web.Application) -> None:
    """Register the Zettle routes (with the `/subscriptions/uuid/{uuid}` alias, see routes.py).
    GET and DELETE never read a body: clients send `[]`."""
    routes.add(
        app,
        "/organizations/{organizationUuid}/subscriptions",
        {"POST": create_subscription, "GET": list_subscriptions, "DELETE": delete_without_uuid},
    )
    routes.add(
        app,
        routes.SUBSCRIPTION,
        {"GET": get_subscription, "PUT": update_subscription, "DELETE": delete_subscription},
    )
