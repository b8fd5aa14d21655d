"""Per-organization rate limits on the subscription API, both dialects (SPEC §4 "Rate limit")."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import ClientResponse

from pusherd.config import RateLimitConfig
from pusherd.ratelimit import RateLimiter
from tests.conftest import ORG, OTHER_ORG, Harness, replace_config

HarnessFactory = Callable[..., Awaitable[Harness]]
LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


def limit_headers(resp: ClientResponse) -> tuple[int, int, int]:
    """(limit, remaining, reset) from the response headers (all must be present)."""
    limit, remaining, reset = (int(resp.headers[h]) for h in LIMIT_HEADERS)
    return limit, remaining, reset


async def test_429_after_per_minute_with_headers_on_every_response(
    harness_factory: HarnessFactory,
) -> None:
    h = await harness_factory(ratelimit={"per_minute": 4, "per_hour": 1000})
    token = h.token()
    auth = h.auth(token)
    # Both dialects, success and error answers alike, count and carry the headers.
    requests = [
        h.api.get("/organizations/self/subscriptions", headers=auth),
        h.api.get("/api/webhooks", headers=auth),
        h.api.get("/api/webhooks/register", headers=auth),  # 404: no webhook yet
        h.api.post("/api/webhooks/register", data=b"[", headers=auth),  # 400
    ]
    expected_status = [200, 200, 404, 400]
    for i, (request, status) in enumerate(zip(requests, expected_status, strict=True)):
        resp = await request
        assert resp.status == status
        limit, remaining, reset = limit_headers(resp)
        assert limit == 4
        assert remaining == 3 - i
        assert 1 <= reset <= 60

    for path in ("/api/webhooks", "/organizations/self/subscriptions"):
        resp = await h.api.get(path, headers=auth)
        assert resp.status == 429
        body = await resp.json()
        assert body["status"] == "error" and body["message"]
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
        limit, remaining, reset = limit_headers(resp)
        assert (limit, remaining) == (4, 0) and 1 <= reset <= 60

    # Another organization has its own budget.
    other = h.auth(h.token(org=OTHER_ORG))
    resp = await h.api.get("/api/webhooks", headers=other)
    assert resp.status == 200
    assert limit_headers(resp)[:2] == (4, 3)

    # Unauthenticated requests are refused before counting and carry no limit headers.
    resp = await h.api.get("/api/webhooks")
    assert resp.status == 401
    assert not any(header in resp.headers for header in LIMIT_HEADERS)


async def test_headers_describe_the_window_with_fewest_requests_left(
    harness_factory: HarnessFactory,
) -> None:
    h = await harness_factory(ratelimit={"per_minute": 100, "per_hour": 2})
    auth = h.auth(h.token())
    resp = await h.api.get("/api/webhooks", headers=auth)
    assert limit_headers(resp)[:2] == (2, 1)
    assert 60 < limit_headers(resp)[2] <= 3600
    resp = await h.api.get("/api/webhooks", headers=auth)
    assert resp.status == 200 and limit_headers(resp)[:2] == (2, 0)
    resp = await h.api.get("/api/webhooks", headers=auth)
    assert resp.status == 429
    assert 60 < int(resp.headers["Retry-After"]) <= 3600


async def test_reload_changes_the_limits(harness_factory: HarnessFactory) -> None:
    h = await harness_factory(ratelimit={"per_minute": 2, "per_hour": 1000})
    auth = h.auth(h.token())
    for _ in range(2):
        assert (await h.api.get("/api/webhooks", headers=auth)).status == 200
    assert (await h.api.get("/api/webhooks", headers=auth)).status == 429

    # What SIGHUP does: the new limits apply at once, counts so far are kept.
    h.runtime.reload(replace_config(h.config, "ratelimit", per_minute=5))
    resp = await h.api.get("/api/webhooks", headers=auth)
    assert resp.status == 200
    assert limit_headers(resp)[:2] == (5, 2)
    for _ in range(2):
        assert (await h.api.get("/api/webhooks", headers=auth)).status == 200
    assert (await h.api.get("/api/webhooks", headers=auth)).status == 429

    h.runtime.reload(replace_config(h.config, "ratelimit", per_minute=1))
    resp = await h.api.get("/organizations/self/subscriptions", headers=auth)
    assert resp.status == 429
    assert limit_headers(resp)[:2] == (1, 0)


def test_reset_and_retry_after_never_exceed_the_window() -> None:
    # At this clock value, start + 60 - now rounds to just over 60.
    now = 16324.4
    limiter = RateLimiter(RateLimitConfig(per_minute=1, per_hour=1000), clock=lambda: now)
    first = limiter.hit(ORG)
    assert first.allowed and first.reset_s == 60
    refused = limiter.hit(ORG)
    assert not refused.allowed
    assert (refused.retry_after_s, refused.reset_s) == (60, 60)
    hourly = RateLimiter(RateLimitConfig(per_minute=100, per_hour=1), clock=lambda: now)
    assert hourly.hit(ORG).reset_s == 3600
    assert hourly.hit(ORG).retry_after_s == 3600
