"""The local ingest listener: POST /events, GET /healthz, GET /metrics (SPEC §5)."""

from __future__ import annotations

import hmac
import uuid as uuidlib
from typing import Any

import orjson
from aiohttp import web

from pusherd.api import routes
from pusherd.api.errors import ApiError, json_response, read_body
from pusherd.auth import bearer
from pusherd.clock import parse_iso
from pusherd.keys import RUNTIME
from pusherd.metrics import CONTENT_TYPE
from pusherd.store.types import IngestResult, NewEvent

MAX_BATCH = 1000
MESSAGE_ID_MAX = 200


_orgs: dict[str, str] = {}  # organizationUuid as sent -> canonical form (a few per shop)


def _canonical_org(org: str, where: str) -> str:
    canonical = _orgs.get(org)
    if canonical is None:
        try:
            canonical = str(uuidlib.UUID(org))
        except ValueError:
            raise ApiError(400, f"{where}organizationUuid is not a valid UUID") from None
        if len(_orgs) >= 4096:
            _orgs.clear()
        _orgs[org] = canonical
    return canonical


def _event(item: Any, known: Any, where: str) -> NewEvent:
    if not isinstance(item, dict):
        raise ApiError(400, f"{where}must be a JSON object")
    name = item.get("eventName")
    if not isinstance(name, str) or not name:
        raise ApiError(400, f"{where}eventName is required")
    if name not in known:
        raise ApiError(400, f"{where}unknown eventName: {name[:100]}")
    org = item.get("organizationUuid")
    if not isinstance(org, str):
        raise ApiError(400, f"{where}organizationUuid is required")
    org = _canonical_org(org, where)
    if "payload" not in item:
        raise ApiError(400, f"{where}payload is required")
    message_id = item.get("messageId")
    if message_id is not None and (
        not isinstance(message_id, str) or not message_id or len(message_id) > MESSAGE_ID_MAX
    ):
        raise ApiError(
            400, f"{where}messageId must be a non-empty string of at most 200 characters"
        )
    if message_id is not None and "\x00" in message_id:
        # Stored as text, which PostgreSQL cannot hold a NUL in (SQLite could, PostgreSQL failed
        # the whole group commit): the same answer on both backends.
        raise ApiError(400, f"{where}messageId must not contain NUL characters")
    timestamp = item.get("timestamp")
    if timestamp is not None and (not isinstance(timestamp, str) or parse_iso(timestamp) is None):
        raise ApiError(400, f"{where}timestamp must be an ISO-8601 date-time string")
    try:
        payload = orjson.dumps(item["payload"]).decode()
    except orjson.JSONEncodeError:
        # orjson reads up to 1024 levels of nesting but writes only 254.
        raise ApiError(400, f"{where}payload is nested too deeply") from None
    return NewEvent(org, name, payload, message_id, timestamp)


def _answer(r: IngestResult, batch: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "messageUuid": r.message_uuid,
        "messageId": r.message_id,
        "deliveries": r.deliveries,
    }
    if batch and r.duplicate:
        out["duplicate"] = True
    return out


async def post_events(request: web.Request) -> web.Response:
    """Store one event or a batch (all or nothing); answer after the commit."""
    runtime = request.app[RUNTIME]
    expected = runtime.config.ingest.token
    if expected:
        given = bearer(request) or ""
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(401, "missing or invalid ingest token", {"WWW-Authenticate": "Bearer"})
    raw = await read_body(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "request body is not valid JSON") from None
    batch = isinstance(body, list)
    items = body if batch else [body]
    if batch and not items:
        raise ApiError(400, "batch is empty")
    if len(items) > MAX_BATCH:
        raise ApiError(400, f"batch has {len(items)} events; at most {MAX_BATCH} are allowed")
    catalogue = runtime.catalogue
    events = [
        _event(item, catalogue, f"events[{i}]: " if batch else "") for i, item in enumerate(items)
    ]
    results = await runtime.store.ingest(events, catalogue.matches)
    fresh = sum(1 for r in results if not r.duplicate)
    if fresh:
        runtime.metrics.events_ingested.inc(fresh)  # the store's change feed wakes the dispatcher
    if batch:
        return json_response([_answer(r, True) for r in results], status=202)
    r = results[0]
    return json_response(_answer(r, False), status=200 if r.duplicate else 202)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 while the process serves."""
    return json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    runtime = request.app[RUNTIME]
    stats = await runtime.store.queue_stats()
    body = runtime.metrics.render(stats)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    """Register the ingest routes."""
    routes.add(app, "/events", {"POST": post_events})
    routes.add(app, "/healthz", {"GET": healthz})
    routes.add(app, "/metrics", {"GET": metrics})
