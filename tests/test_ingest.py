"""POST /events (SPEC §5): answers, idempotency, batches, errors, matching, order."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from pusherd.store.db import connect_sync
from tests.conftest import ORG, OTHER_ORG, Harness, Receiver

HarnessFactory = Callable[..., Awaitable[Harness]]
ReceiverFactory = Callable[..., Awaitable[Receiver]]


def event(name: str = "ProductCreated", org: str = ORG, **extra: Any) -> dict[str, Any]:
    """One ingest event body."""
    return {"eventName": name, "organizationUuid": org, "payload": {"n": 1}, **extra}


async def post(h: Harness, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST raw JSON (or bytes) to /events; return status and parsed body."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    resp = await h.ingest.post(
        "/events", data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    return resp.status, orjson.loads(await resp.read())


def assert_error(status: int, body: Any, expected: int) -> None:
    assert status == expected, body
    assert body["status"] == "error"
    assert isinstance(body["message"], str) and body["message"]


def stored_events(h: Harness) -> int:
    """How many events the database file holds, read on a separate connection."""
    conn = connect_sync(h.config.storage.path)
    try:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
    finally:
        conn.close()


def stored_deliveries(h: Harness) -> int:
    conn = connect_sync(h.config.storage.path)
    try:
        return int(conn.execute("SELECT count(*) FROM deliveries").fetchone()[0])
    finally:
        conn.close()


# -- answers ---------------------------------------------------------------------------------


async def subscribed(harness: Harness, receiver: Receiver) -> None:
    """Subscribe the receiver to ProductCreated and wait for its TestMessage."""
    await harness.subscribe(harness.token(), receiver.url, ["ProductCreated"])
    await receiver.wait_for(1, "TestMessage")


async def created_and_updated(
    harness: Harness, receiver_factory: ReceiverFactory
) -> tuple[Receiver, Receiver]:
    """Two receivers: one subscribed to ProductCreated, one to ProductCreated and Updated."""
    token = harness.token()
    a, b = await receiver_factory(), await receiver_factory()
    await harness.subscribe(token, a.url, ["ProductCreated"])
    await harness.subscribe(token, b.url, ["ProductCreated", "ProductUpdated"])
    return a, b


async def test_single_event_answers_202_with_uuid_id_and_delivery_count(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    _, b = await created_and_updated(harness, receiver_factory)

    status, body = await post(harness, event(messageId="order-1"))
    assert status == 202
    assert set(body) == {"messageUuid", "messageId", "deliveries"}
    assert uuid.UUID(body["messageUuid"])
    assert body["messageId"] == "order-1"
    assert body["deliveries"] == 2

    status, body = await post(harness, event("ProductUpdated"))
    assert status == 202
    assert body["deliveries"] == 1
    assert str(uuid.UUID(body["messageId"])) == body["messageId"]  # generated when absent
    await b.wait_for(1, "ProductUpdated")
    assert b.events("ProductUpdated")[0]["messageId"] == body["messageId"]


async def test_generated_message_ids_are_time_ordered_uuid7(harness: Harness) -> None:
    status, answers = await post(harness, [event() for _ in range(300)])
    assert status == 202
    ids = [a["messageId"] for a in answers]
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    created_ms = int(ids[0].replace("-", "")[:12], 16)
    assert abs(created_ms - time.time() * 1000) < 60_000  # the unix-millisecond prefix


async def test_event_without_subscribers_is_stored_with_zero_deliveries(harness: Harness) -> None:
    status, body = await post(harness, event(payload=None))
    assert status == 202
    assert body["deliveries"] == 0
    assert stored_events(harness) == 1


async def test_batch_answers_an_array_in_order(harness: Harness, receiver: Receiver) -> None:
    token = harness.token()
    await harness.subscribe(token, receiver.url, ["ProductCreated"])
    items = [
        event(messageId="b-1"),
        event("InvoiceCreated", messageId="b-2"),
        event(messageId="b-3", payload=[1, 2, 3]),
    ]
    status, body = await post(harness, items)
    assert status == 202
    assert [r["messageId"] for r in body] == ["b-1", "b-2", "b-3"]
    assert [r["deliveries"] for r in body] == [1, 0, 1]
    assert len({r["messageUuid"] for r in body}) == 3
    assert all("duplicate" not in r or r["duplicate"] is False for r in body)
    await receiver.wait_for(2, "ProductCreated")
    got = {e["messageId"]: e["messageUuid"] for e in receiver.events("ProductCreated")}
    assert got == {"b-1": body[0]["messageUuid"], "b-3": body[2]["messageUuid"]}


async def test_batch_of_1000_is_accepted(harness: Harness) -> None:
    status, body = await post(harness, [event() for _ in range(1000)])
    assert status == 202
    assert len(body) == 1000
    assert stored_events(harness) == 1000


async def test_large_mixed_batch_keeps_array_order_and_duplicates_across_statements(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    # 999 items are written by several multi-row statements of different sizes: order, the
    # fan-out of each item and in-batch duplicates must not depend on where those split.
    a, b = await created_and_updated(harness, receiver_factory)
    items = [
        event("ProductUpdated" if i % 3 else "ProductCreated", messageId=f"k{i % 700}")
        for i in range(999)
    ]
    status, body = await post(harness, items)
    assert status == 202
    assert [r["messageId"] for r in body] == [f"k{i % 700}" for i in range(999)]
    assert [r.get("duplicate", False) for r in body] == [i >= 700 for i in range(999)]
    for i in range(700, 999):  # a repeat answers with its first item's uuid and fan-out
        assert body[i]["messageUuid"] == body[i - 700]["messageUuid"]
        assert body[i]["deliveries"] == body[i - 700]["deliveries"]
    assert [r["deliveries"] for r in body[:700]] == [1 if i % 3 else 2 for i in range(700)]
    with contextlib.closing(sqlite3.connect(harness.config.storage.path)) as conn:
        stored = conn.execute(
            "SELECT e.message_id, d.subscription, d.id FROM events e JOIN deliveries d"
            " ON d.event_seq = e.seq WHERE e.message_id LIKE 'k%' ORDER BY e.seq, d.id"
        ).fetchall()
    assert [m for m, _, _ in stored] == [
        f"k{i}" for i in range(700) for _ in range(1 if i % 3 else 2)
    ]
    assert [d for _, _, d in stored] == sorted(d for _, _, d in stored)  # ids in array order
    await b.wait_for(700 + 1)  # and every delivery arrives: the TestMessage and 700 events
    assert [e["messageId"] for e in b.events() if e["eventName"] != "TestMessage"] == [
        f"k{i}" for i in range(700)
    ]
    created = [f"k{i}" for i in range(700) if i % 3 == 0]
    await a.wait_for(len(created), "ProductCreated")
    assert [e["messageId"] for e in a.events("ProductCreated")] == created


# -- idempotency -------------------------------------------------------------------------------


async def test_repeated_message_id_answers_200_with_original_uuid_and_no_second_fan_out(
    harness: Harness, receiver: Receiver
) -> None:
    await subscribed(harness, receiver)

    status, first = await post(harness, event(messageId="m-1"))
    assert status == 202
    status, again = await post(harness, event(messageId="m-1", payload={"other": True}))
    assert status == 200
    assert again["messageUuid"] == first["messageUuid"]
    assert again["messageId"] == "m-1"

    await harness.idle()
    assert len(receiver.events("ProductCreated")) == 1
    assert orjson.loads(receiver.events("ProductCreated")[0]["payload"]) == {"n": 1}
    assert stored_events(harness) == 2  # the TestMessage and m-1


async def test_message_id_is_per_organization(harness: Harness) -> None:
    status, mine = await post(harness, event(messageId="shared"))
    assert status == 202
    status, theirs = await post(harness, event(org=OTHER_ORG, messageId="shared"))
    assert status == 202
    assert theirs["messageUuid"] != mine["messageUuid"]


async def test_batch_marks_duplicates_also_within_the_batch(
    harness: Harness, receiver: Receiver
) -> None:
    await subscribed(harness, receiver)
    status, old = await post(harness, event(messageId="seen"))
    assert status == 202

    items = [
        event(messageId="new"),
        event(messageId="seen"),
        event(messageId="new"),
        event(messageId="other"),
    ]
    status, body = await post(harness, items)
    assert status == 202
    assert [r.get("duplicate", False) for r in body] == [False, True, True, False]
    assert body[1]["messageUuid"] == old["messageUuid"]
    assert body[2]["messageUuid"] == body[0]["messageUuid"]
    assert [r["messageId"] for r in body] == ["new", "seen", "new", "other"]

    await harness.idle()
    ids = sorted(e["messageId"] for e in receiver.events("ProductCreated"))
    assert ids == ["new", "other", "seen"]


# -- batches are all or nothing -------------------------------------------------------------


async def test_one_bad_event_rejects_the_whole_batch(harness: Harness, receiver: Receiver) -> None:
    await subscribed(harness, receiver)
    before = stored_events(harness)

    items = [event(messageId="r-1"), event(messageId="r-2"), event("NoSuchEvent")]
    status, body = await post(harness, items)
    assert_error(status, body, 400)
    assert "NoSuchEvent" in body["message"]
    assert stored_events(harness) == before

    # Nothing of the batch was kept: the same ids are new, not duplicates.
    status, body = await post(harness, items[:2])
    assert status == 202
    assert [r.get("duplicate", False) for r in body] == [False, False]
    await harness.idle()
    assert sorted(e["messageId"] for e in receiver.events("ProductCreated")) == ["r-1", "r-2"]


@pytest.mark.parametrize("size", [0, 1001])
async def test_empty_or_oversized_batch_is_400(harness: Harness, size: int) -> None:
    status, body = await post(harness, [event() for _ in range(size)])
    assert_error(status, body, 400)
    assert stored_events(harness) == 0


# -- validation --------------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, Any]] = [
    ("not json", b"{not json"),
    ("empty body", b""),
    ("not an object", 42),
    ("missing eventName", {"organizationUuid": ORG, "payload": {}}),
    ("missing organizationUuid", {"eventName": "ProductCreated", "payload": {}}),
    ("missing payload", {"eventName": "ProductCreated", "organizationUuid": ORG}),
    ("unknown eventName", event("NoSuchEvent")),
    ("eventName not a string", event(eventName=7)),
    ("bad organization UUID", event(org="not-a-uuid")),
    ("timestamp not ISO-8601", event(timestamp="yesterday at noon")),
    ("timestamp impossible date", event(timestamp="2024-13-45T10:00:00Z")),
    ("timestamp a number", event(timestamp=1700000000)),
    ("bad item in batch", [event(), "not an object"]),
]


@pytest.mark.parametrize(("case", "body"), BAD_BODIES, ids=[c for c, _ in BAD_BODIES])
async def test_invalid_events_are_400(harness: Harness, case: str, body: Any) -> None:
    status, answer = await post(harness, body)
    assert_error(status, answer, 400)
    assert stored_events(harness) == 0


async def test_ingest_token_guards_post_events_only(harness_factory: HarnessFactory) -> None:
    h = await harness_factory(ingest={"token": "s3cret-ingest-token"})
    status, body = await post(h, event())
    assert_error(status, body, 401)
    status, body = await post(h, event(), headers={"Authorization": "Bearer wrong"})
    assert_error(status, body, 401)
    assert stored_events(h) == 0

    resp = await h.ingest.post(
        "/events", json=event(), headers={"Authorization": "Bearer s3cret-ingest-token"}
    )
    assert resp.status == 202
    for client in (h.ingest, h.api):
        resp = await client.get("/healthz")
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_body_over_max_body_is_413(harness_factory: HarnessFactory) -> None:
    h = await harness_factory(ingest={"max_body": "1KiB"})
    status, body = await post(h, event(payload="x" * 2000))
    assert_error(status, body, 413)
    assert stored_events(h) == 0
    status, body = await post(h, event(payload="x" * 500))
    assert status == 202


async def test_store_that_cannot_commit_answers_503_and_acknowledges_nothing(
    harness: Harness, receiver: Receiver
) -> None:
    await subscribed(harness, receiver)
    await harness.idle()
    before = stored_events(harness)

    # A full disk, as SQLite sees one: the writer may not grow the file any more.
    writer: sqlite3.Connection = harness.runtime.store.db.writer  # type: ignore[attr-defined]
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count = {pages}")
    big = {"blob": "x" * 200_000}
    status, body = await post(harness, event(messageId="full-1", payload=big))
    assert_error(status, body, 503)
    status, body = await post(harness, [event(messageId="full-2"), event(payload=big)])
    assert_error(status, body, 503)

    writer.execute("PRAGMA max_page_count = 1073741823")
    assert stored_events(harness) == before
    # Nothing was acknowledged: the same messageIds are new now.
    status, body = await post(harness, event(messageId="full-1", payload=big))
    assert status == 202
    status, body = await post(harness, event(messageId="full-2"))
    assert status == 202
    await receiver.wait_for(2, "ProductCreated")


async def test_concurrent_requests_sharing_a_commit_get_their_own_answers(
    harness: Harness, receiver: Receiver
) -> None:
    await subscribed(harness, receiver)
    # Sent at once, these wait for the same group commit and are written together.
    bodies: list[Any] = [
        event(messageId="c-1"),
        [event(messageId="c-2"), event("ProductUpdated", messageId="c-3")],
        event(messageId="c-1"),  # the same messageId as the first, in the same commit
        event(messageId="c-4"),
    ]
    answers = await asyncio.gather(*(post(harness, b) for b in bodies))
    statuses = [status for status, _ in answers]
    assert statuses[1] == 202 and statuses[3] == 202
    first, batch, again, last = (body for _, body in answers)
    assert [r["messageId"] for r in batch] == ["c-2", "c-3"]
    assert [r["deliveries"] for r in batch] == [1, 0]
    assert last["messageId"] == "c-4" and last["deliveries"] == 1
    # Whichever of the two c-1 requests was written first, the other is its duplicate.
    assert again["messageUuid"] == first["messageUuid"]
    assert sorted([statuses[0], statuses[2]]) == [200, 202]
    await receiver.wait_for(3, "ProductCreated")
    await harness.idle()
    assert sorted(e["messageId"] for e in receiver.events("ProductCreated")) == [
        "c-1",
        "c-2",
        "c-4",
    ]


async def test_a_failed_shared_commit_fails_every_request_in_it_and_the_next_one_works(
    harness: Harness,
) -> None:
    writer: sqlite3.Connection = harness.runtime.store.db.writer  # type: ignore[attr-defined]
    pages = writer.execute("PRAGMA page_count").fetchone()[0]
    writer.execute(f"PRAGMA max_page_count = {pages}")
    big = {"blob": "x" * 200_000}
    answers = await asyncio.gather(
        post(harness, event(messageId="f-1", payload=big)),
        post(harness, event(messageId="f-2")),
    )
    for status, body in answers:
        assert_error(status, body, 503)
    writer.execute("PRAGMA max_page_count = 1073741823")
    status, body = await post(harness, event(messageId="f-2"))
    assert status == 202 and body["messageId"] == "f-2"


async def test_a_commit_that_cannot_begin_answers_503_and_the_next_one_works(
    harness: Harness,
) -> None:
    writer: sqlite3.Connection = harness.runtime.store.db.writer  # type: ignore[attr-defined]
    writer.execute("PRAGMA busy_timeout = 0")
    other = sqlite3.connect(harness.config.storage.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        answers = await asyncio.gather(post(harness, event()), post(harness, event()))
        for status, body in answers:
            assert_error(status, body, 503)
        other.execute("ROLLBACK")
    finally:
        other.close()
        writer.execute("PRAGMA busy_timeout = 5000")
    status, body = await post(harness, event(messageId="after-busy"))
    assert status == 202 and body["messageId"] == "after-busy"


# -- matching ----------------------------------------------------------------------------------


async def test_deliveries_go_to_matching_live_subscriptions_of_the_same_organization(
    harness: Harness, receiver_factory: ReceiverFactory
) -> None:
    named, product_wild, finance_wild, other_org, gone = [await receiver_factory() for _ in "12345"]
    gone.statuses = [410]
    await harness.subscribe(harness.token(), named.url, ["ProductCreated"])
    await harness.subscribe(harness.token(scopes=("READ:PRODUCT",)), product_wild.url, [])
    await harness.subscribe(harness.token(scopes=("READ:FINANCE",)), finance_wild.url, [])
    await harness.subscribe(harness.token(org=OTHER_ORG), other_org.url, ["ProductCreated"])
    await harness.subscribe(harness.token(), gone.url, ["ProductCreated"])
    await gone.wait_for(1, "TestMessage")  # answered 410: that subscription is DISABLED
    await harness.idle()

    expected = {
        "ProductCreated": 2,  # named + product wildcard
        "InventoryBalanceChanged": 1,  # product wildcard
        "InvoiceCreated": 1,  # finance wildcard
        "PurchaseCreated": 0,  # nobody holds READ:PURCHASE
        "ApplicationConnectionRemoved": 2,  # any scope: both wildcards
    }
    for name, count in expected.items():
        status, body = await post(harness, event(name, messageId=name))
        assert status == 202
        assert body["deliveries"] == count, name
    await harness.idle()

    def names(r: Receiver) -> list[str]:
        return sorted(e["eventName"] for e in r.events() if e["eventName"] != "TestMessage")

    assert names(named) == ["ProductCreated"]
    assert names(product_wild) == [
        "ApplicationConnectionRemoved",
        "InventoryBalanceChanged",
        "ProductCreated",
    ]
    assert names(finance_wild) == ["ApplicationConnectionRemoved", "InvoiceCreated"]
    assert names(other_org) == []
    assert names(gone) == []


async def test_events_reach_a_subscriber_in_ingest_order(
    harness: Harness, receiver: Receiver
) -> None:
    await subscribed(harness, receiver)
    sent = []
    for i in range(20):
        body = await harness.emit(messageId=f"single-{i}")
        sent.append(body["messageId"])
    status, body = await post(harness, [event(messageId=f"batch-{i}") for i in range(30)])
    assert status == 202
    sent += [r["messageId"] for r in body]
    await receiver.wait_for(len(sent), "ProductCreated")
    assert [e["messageId"] for e in receiver.events("ProductCreated")] == sent


# -- hostile input: deep nesting, encodings, path forms -----------------------------------------


def nested(depth: int, kind: str = "array") -> bytes:
    """A JSON value `depth` levels deep."""
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def raw_event(payload: bytes) -> bytes:
    return b'{"eventName":"ProductCreated","organizationUuid":"%s","payload":%s}' % (
        ORG.encode(),
        payload,
    )


@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize("depth", [255, 600, 1000])
async def test_payloads_nested_deeper_than_orjson_writes_are_400(
    harness: Harness, depth: int, kind: str
) -> None:
    # orjson reads up to 1024 levels but writes only 254: valid JSON, but not storable
    deep = raw_event(nested(depth, kind))
    status, answer = await post(harness, deep)
    assert_error(status, answer, 400)
    assert "nested" in answer["message"]
    status, answer = await post(harness, b"[" + orjson.dumps(event()) + b"," + deep + b"]")
    assert_error(status, answer, 400)
    assert answer["message"].startswith("events[1]: ")
    assert stored_events(harness) == 0
    status, answer = await post(harness, raw_event(nested(200, kind)))
    assert status == 202, answer


async def test_bodies_whose_content_encoding_does_not_decode_are_400(harness: Harness) -> None:
    import gzip
    import zlib

    good = orjson.dumps(event())
    cases = [
        ("gzip", b"this is not gzip"),
        ("gzip", gzip.compress(good)[:-12]),  # cut short
        ("deflate", b"\xff\xfe\xfd not deflate"),
        ("x-bogus", good),
        ("gzip, identity", gzip.compress(good)),
    ]
    for coding, data in cases:
        resp = await harness.ingest.post(
            "/events",
            data=data,
            headers={"Content-Type": "application/json", "Content-Encoding": coding},
        )
        assert resp.status == 400, (coding, await resp.text())
        assert (await resp.json())["status"] == "error"
    assert stored_events(harness) == 0
    for coding, data in (("gzip", gzip.compress(good)), ("deflate", zlib.compress(good))):
        resp = await harness.ingest.post("/events", data=data, headers={"Content-Encoding": coding})
        assert resp.status == 202, (coding, await resp.text())
    # the API listener reads bodies the same way
    token = harness.token()
    resp = await harness.api.post(
        "/organizations/self/subscriptions",
        data=b"not gzip",
        headers={**harness.auth(token), "Content-Encoding": "gzip"},
    )
    assert resp.status == 400
    assert (await resp.json())["status"] == "error"


async def test_ingest_routes_answer_with_a_trailing_slash(
    harness: Harness, receiver: Receiver
) -> None:
    await subscribed(harness, receiver)
    resp = await harness.ingest.post("/events/", json=event())
    assert resp.status == 202, await resp.text()
    await receiver.wait_for(1, "ProductCreated")
    for client in (harness.ingest, harness.api):
        resp = await client.get("/healthz/")
        assert resp.status == 200 and await resp.json() == {"status": "ok"}
    resp = await harness.ingest.get("/metrics/")
    assert resp.status == 200
    assert "pusherd_events_ingested_total 1" in await resp.text()
    resp = await harness.ingest.put("/events/")
    assert resp.status == 405
    assert (await resp.json())["status"] == "error"
