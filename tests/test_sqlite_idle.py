"""An idle SQLite daemon's upkeep costs what is pending or written, not the number of
subscriptions: the minutely search for subscriptions to close, and the WAL checkpoints."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pusherd.delivery.dispatcher import IDLE_POLL_S, POLL_S
from pusherd.store import Store, open_store
from pusherd.store.sqlite import db as sqlite_db
from pusherd.store.sqlite.db import Database
from pusherd.store.types import NewEvent, NewSubscription
from tests.conftest import Harness, Receiver
from tests.service import run_cli_async

ORG = "11111111-1111-4111-8111-111111111111"
SUBSCRIPTIONS = 3000
_ids = itertools.count()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Any]:
    s = await open_store(str(tmp_path / "pusherd.sqlite3"), background=False)
    try:
        yield s
    finally:
        await s.close()


async def subscribe_many(store: Store, n: int, org: str = ORG) -> list[str]:
    made = await asyncio.gather(
        *(
            store.create_subscription(
                NewSubscription(
                    str(uuid.uuid4()),
                    org,
                    "WEBHOOK",
                    (),
                    ("READ:PRODUCT",),
                    f"http://127.0.0.1:9/{i % 50}",
                    None,
                    "k" * 32,
                ),
                None,
            )
            for i in range(n)
        )
    )
    return [s.uuid for s in made]


async def ingest(store: Store, org: str, n: int) -> None:
    events = [NewEvent(org, "ProductCreated", "{}", f"m-{next(_ids)}", None) for _ in range(n)]
    await store.ingest(events, lambda *_: True)


async def reader_steps(store: Any, query: Any) -> tuple[Any, int]:
    """query()'s result and how many SQLite VM instructions its reads ran on the reader
    connection (counted in hundreds by a progress handler: deterministic, unlike a timing)."""
    ticks = 0

    def tick() -> int:
        nonlocal ticks
        ticks += 1
        return 0

    reader = store.db._reader
    await reader.set_progress_handler(tick, 100)
    try:
        result = await query()
    finally:
        await reader.set_progress_handler(None, 100)
    return result, ticks * 100


async def test_subscriptions_to_close_costs_what_is_pending_not_the_subscriptions(
    store: Any,
) -> None:
    await subscribe_many(store, SUBSCRIPTIONS)
    found, steps = await reader_steps(store, store.subscriptions_to_close)
    assert found == []
    # A scan of 3,000 subscriptions runs some 15,000 instructions; the walk of an empty
    # pending index a handful.
    assert steps < 1000

    # Pending rows of live, deleted and DISABLED subscriptions of three organizations.
    orgs = [str(uuid.uuid4()) for _ in range(3)]
    subs = [(await subscribe_many(store, 2, org)) for org in orgs]
    for org in orgs:
        await ingest(store, org, 3)
    deleted, disabled = subs[0][0], subs[1][1]
    assert await store.delete_subscription(orgs[0], deleted)
    await store.db.write(
        lambda c: c.execute(
            "UPDATE subscriptions SET status = 'DISABLED' WHERE uuid = ?", (disabled,)
        )
    )
    found, steps = await reader_steps(store, store.subscriptions_to_close)
    assert sorted(found) == sorted([deleted, disabled])
    assert steps < 2000  # six subscriptions with pending rows, whatever the other 3,000

    assert await store.close_pending(deleted, 100) == ("cancelled", 3)
    assert await store.subscriptions_to_close() == [disabled]


async def test_the_checkpointer_skips_a_wal_nothing_was_written_to(tmp_path: Path) -> None:
    db = Database(tmp_path / "pusherd.sqlite3", background=False)
    await db.open()
    try:
        checkpoints = 0
        real = db.checkpoint

        async def counted() -> None:
            nonlocal checkpoints
            checkpoints += 1
            await real()

        db.checkpoint = counted  # type: ignore[method-assign]
        assert not await db.checkpoint_if_written()  # freshly opened, nothing written
        await db.write(lambda c: c.execute("PRAGMA user_version"))
        assert await db.checkpoint_if_written()
        assert not await db.checkpoint_if_written()  # idle since: no checkpoint
        assert checkpoints == 1
        await db.write(lambda c: c.execute("PRAGMA user_version"), durable=False)
        assert await db.checkpoint_if_written()
        assert checkpoints == 2
    finally:
        await db.close()


async def test_checkpoints_follow_writes_and_an_idle_database_has_no_timer(
    tmp_path: Path,
) -> None:
    # A checkpoint runs half a second after a write (one for a burst of writes); with nothing
    # written there is nothing scheduled at all: no wake-up of an idle daemon for it.
    db = Database(tmp_path / "pusherd.sqlite3")
    await db.open()
    try:
        looks = done = 0
        real = db.checkpoint_if_written

        async def counted() -> bool:
            nonlocal looks, done
            looks += 1
            ran = await real()
            done += ran
            return ran

        db.checkpoint_if_written = counted  # type: ignore[method-assign]
        await asyncio.sleep(1.2)  # idle from the start
        assert looks == 0
        for _ in range(5):
            await db.write(lambda c: c.execute("PRAGMA user_version"))
        deadline = time.monotonic() + 5
        while not done:
            assert time.monotonic() < deadline, "no checkpoint after the writes"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.2)  # idle again
        assert (looks, done) == (1, 1)
        await db.write(lambda c: c.execute("CREATE TABLE t (x)"))
        deadline = time.monotonic() + 5
        while done < 2:
            assert time.monotonic() < deadline, "no checkpoint after the next write"
            await asyncio.sleep(0.05)
    finally:
        await db.close()


async def test_a_purge_with_nothing_old_reads_no_events(store: Any) -> None:
    await subscribe_many(store, 1)
    for _ in range(4):
        await ingest(store, ORG, 500)
    cutoff_ms = int(time.time() * 1000) - 30 * 24 * 3600 * 1000  # the default retention
    removed, steps = await reader_steps(store, lambda: store.purge(cutoff_ms, 500))
    assert removed == 0
    # A scan of 2,000 events (looking for old ones no delivery needs) runs some 6,000
    # instructions; a range of the age index that is empty, a handful.
    assert steps < 1000


async def test_an_idle_daemons_poll_claims_nothing_until_something_is_committed(
    tmp_path: Path,
    harness_factory: Callable[..., Awaitable[Harness]],
    receiver_factory: Callable[..., Awaitable[Receiver]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Idle, the poll's one question is whether anything was committed since the last one
    # (SQLite's data_version): the claim and its walk of the origins stay asleep, and after
    # one such poll it asks every 10 s. A replay by another process (the CLI) wakes it.
    h = await harness_factory()
    receiver = await receiver_factory()
    sub = await h.subscribe(h.token(), receiver.url)
    await receiver.wait_for(1, "TestMessage")
    await h.idle()
    store: Any = h.runtime.dispatcher.store
    claims = quiet = 0
    claim, may_have_changed = store.claim, store.may_have_changed

    async def counted_claim(*args: Any, **kwargs: Any) -> Any:
        nonlocal claims
        claims += 1
        return await claim(*args, **kwargs)

    async def counted_look() -> bool:
        nonlocal quiet
        changed: bool = await may_have_changed()
        quiet += not changed
        return changed

    monkeypatch.setattr(store, "claim", counted_claim)
    monkeypatch.setattr(store, "may_have_changed", counted_look)
    deadline = time.monotonic() + 10
    while not quiet:  # the last records and their checkpoint are behind us
        assert time.monotonic() < deadline, "no poll found the database unchanged"
        await asyncio.sleep(0.05)
    claims, quiet = 0, 0
    # The window observed: after a quiet poll, none until IDLE_POLL_S (10 s) later, where a
    # poll a second would have made four.
    await asyncio.sleep(4 * POLL_S + 0.5)
    assert quiet == 0, quiet
    assert claims == 0

    config = tmp_path / "cli.toml"
    config.write_text(f'[storage]\npath = "{h.config.storage.path}"\n')
    code, out, err = await run_cli_async("replay", "--config", str(config), "--subscription",
                                         sub["uuid"])  # fmt: skip
    assert code == 0 and "queued 1 " in out, err
    # The replaying process tells the daemon (wake.py): no wait for the idle poll.
    await receiver.wait_for(2, "TestMessage", timeout=IDLE_POLL_S / 4)
    assert claims >= 1


async def test_a_wake_with_nobody_listening_is_harmless_and_a_second_daemon_still_opens(
    tmp_path: Path,
) -> None:
    from pusherd.store.sqlite.wake import send_wake

    path = str(tmp_path / "pusherd.sqlite3")
    send_wake(path)  # no daemon serves the file: nothing to tell, nothing raised
    first, second = await open_store(path), await open_store(path)
    woken: list[str] = []
    first.changes.subscribe(lambda c: woken.append(c.kind))
    second.changes.subscribe(lambda c: woken.append("second:" + c.kind))
    try:
        send_wake(path)  # only the first could listen: the second relies on its poll
        deadline = time.monotonic() + 5
        while not woken:
            assert time.monotonic() < deadline, "the listening store was not woken"
            await asyncio.sleep(0.01)
        assert woken == ["deliveries_queued"]
    finally:
        await second.close()
        await first.close()


async def test_only_a_claim_settles_what_may_have_changed(store: Any) -> None:
    # A poll that looked but did not claim (no budget, a hand-back settling) must not use up
    # the news of a commit: the next poll would then skip the claim, and a retry written
    # meanwhile wait for the idle poll.
    await store.claim("me", {}, 4, 100, 60_000)
    assert not await store.may_have_changed()
    await subscribe_many(store, 1)
    assert await store.may_have_changed()
    assert await store.may_have_changed()  # still: no claim has read it
    await store.claim("me", {}, 4, 100, 60_000)
    assert not await store.may_have_changed()


def file_size(path: Path) -> int:
    return path.stat().st_size


async def test_the_wal_starts_over_under_writes_that_never_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint beside the writer never catches up with a writer that never pauses, so
    # SQLite never started the WAL over: creating 100,000 subscriptions grew it to 2.4 GB, and
    # the creation rate fell as every page read searched a longer WAL index. The writer now
    # finishes the checkpoint between two commits, and the WAL stays short however much is
    # written (with readers that never pause too: the next test).
    monkeypatch.setattr(sqlite_db, "CHECKPOINT_EVERY_S", 0.02)
    path = tmp_path / "pusherd.sqlite3"
    db = Database(path)
    await db.open()
    try:
        await db.write(lambda c: c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)"))
        blob = os.urandom(8192)
        wal = Path(f"{path}-wal")
        largest = written = 0
        for i in range(3000):  # 3000 commits of 8 KiB rows plus their pages: ~ 40 MB of WAL
            await db.write(lambda c, i=i: c.execute("INSERT INTO t VALUES (?, ?)", (i, blob)))
            written += len(blob)
            if i % 50 == 0:
                largest = max(largest, file_size(wal))
                await asyncio.sleep(0)  # the checkpointer's task gets its turn
        assert written > 20 * 1024 * 1024
        assert largest < 12 * 1024 * 1024, f"WAL grew to {largest >> 20} MiB"
        rows = await db.read("SELECT count(*) FROM t")
        assert rows[0][0] == 3000
    finally:
        await db.close()


async def test_the_wal_starts_over_under_reads_that_never_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reader that always holds a snapshot of the WAL (back-to-back scans: listings, a
    # console) keeps SQLite from starting it over after a checkpoint that copied everything;
    # past WAL_FORCE_FRAMES the writer's checkpoint waits briefly for those readers instead.
    monkeypatch.setattr(sqlite_db, "CHECKPOINT_EVERY_S", 0.05)
    monkeypatch.setattr(sqlite_db, "WAL_RESTART_FRAMES", 200)
    monkeypatch.setattr(sqlite_db, "WAL_FORCE_FRAMES", 1000)  # 4 MiB
    path = tmp_path / "pusherd.sqlite3"
    db = Database(path)
    await db.open()
    writing = True

    async def scan() -> int:
        scans = 0
        while writing:
            await db.read("SELECT count(*), sum(length(v)) FROM t")
            scans += 1
        return scans

    try:
        await db.write(lambda c: c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)"))
        reader = asyncio.create_task(scan())
        blob = os.urandom(8192)
        wal = Path(f"{path}-wal")
        largest = 0
        end = time.monotonic() + 2.0

        async def write() -> None:
            nonlocal largest
            while time.monotonic() < end:
                await db.write(lambda c: c.execute("INSERT INTO t (v) VALUES (?)", (blob,)))
                largest = max(largest, file_size(wal))

        # Four writers for two seconds: a group commit every few milliseconds.
        await asyncio.gather(*(write() for _ in range(4)))
        writing = False
        assert await reader > 10
        # Without the wait for readers it grew to 51-121 MiB in these two seconds.
        assert largest < 32 * 1024 * 1024, f"WAL grew to {largest >> 20} MiB"
    finally:
        writing = False
        await db.close()
