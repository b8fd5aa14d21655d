"""The SQLite file at run time: the group-committing writer, its checkpoints, and the readers.

Writes run on the event loop's thread on one `sqlite3` connection. Every write is a function of the
connection; all writes that are waiting when the writer runs share one `BEGIN IMMEDIATE` transaction
and one fsync (group commit), each inside its own SAVEPOINT so that one failing write does not undo
the others. A hop to a worker thread per write would cost more than the commit itself (SPEC §7).
Reads that may scan many rows go through an aiosqlite connection so they never block the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import structlog

from pusherd.store.errors import StoreError
from pusherd.store.sqlite.schema import BUSY_TIMEOUT_MS, connect_sync

T = TypeVar("T")
log = structlog.get_logger("pusherd.store")

GROUP_WINDOW_S = 0.005
CHECKPOINT_EVERY_S = 0.5
# WAL frames (pages) left after a checkpoint beyond which the writer finishes the job between
# two commits (SQLite's own auto-checkpoint size). Under writes that never pause, a checkpoint
# beside the writer never catches up with it, and the WAL would never start over.
WAL_RESTART_FRAMES = 1000
# The size a WAL file is cut back to when it starts over (SQLite keeps its largest size otherwise).
WAL_SIZE_LIMIT = 64 * 1024 * 1024
# Beyond this many frames (64 MiB of 4 KiB pages) the writer's checkpoint also waits, up to
# RESTART_WAIT_MS, for readers still on the old WAL to finish (RESTART): reads that never pause
# (listings, a console) would otherwise hold a snapshot at every chance the WAL had to start over.
WAL_FORCE_FRAMES = 16384
RESTART_WAIT_MS = 100


def _commit_now(conn: sqlite3.Connection) -> None:
    """COMMIT and its fsync; sqlite3 releases the GIL meanwhile."""
    conn.execute("COMMIT")


def _checkpoint_writer(conn: sqlite3.Connection, restart: bool) -> None:
    """A checkpoint by the writer between two commits: no commit of this process can come
    between its start and its end, so it copies every frame (unless a reader still needs one)
    and the next write starts the WAL over. restart: also wait briefly for the readers of the
    old WAL, so that the next write can start it over even under reads that never pause."""
    if not restart:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        return
    conn.execute(f"PRAGMA busy_timeout = {RESTART_WAIT_MS}")
    try:
        conn.execute("PRAGMA wal_checkpoint(RESTART)")  # busy after the wait: the next one
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


WriteFn = Callable[[sqlite3.Connection], Any]
_Write = tuple[WriteFn, "asyncio.Future[Any]", bool]  # (fn, its future, durable)


class Database:
    """The writer connection with group commit, a quick reader, and an aiosqlite reader.

    Statements of a group commit run on the event loop's thread (a thread hop per statement
    would cost more than the statement); its COMMIT, when it must be fsync'd, runs on a
    dedicated thread, so the loop keeps serving while the disk syncs and the writes that arrive
    meanwhile form the next group (pipelined group commit). Small indexed reads use their own
    connection on the loop's thread, so they never wait for a commit in flight.
    """

    def __init__(self, path: str | Path, *, background: bool = True) -> None:
        self.path = str(path)
        # False for a short-lived command next to a running daemon: no checkpoints of its own,
        # and no WAL truncation at close (the daemon's writes would wait for it).
        self.background = background
        self._writer: sqlite3.Connection | None = None
        self._quick: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._checkpoint_at: asyncio.TimerHandle | None = None
        self._closing = False
        self._syncer: ThreadPoolExecutor | None = None
        self._urgent: list[_Write] = []
        self._deferred: list[_Write] = []
        self._soon: asyncio.Handle | None = None
        self._later: asyncio.TimerHandle | None = None
        self._in_flight: asyncio.Future[None] | None = None  # a COMMIT on the syncer thread
        self._written = False  # committed since the last checkpoint
        self._catch_up = False  # the last checkpoint left a long WAL: the writer finishes it
        self._force_restart = False  # ... and it was very long: wait for readers too

    async def open(self) -> None:
        """Open, configure and migrate the file; checkpoint the WAL off the event loop."""
        self._writer = connect_sync(self.path)
        # A checkpoint inside a commit would stall the writer for its fsyncs: the reader's
        # thread runs them instead.
        self._writer.execute("PRAGMA wal_autocheckpoint = 0")
        self._writer.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        self._quick = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._quick.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._quick.execute("PRAGMA query_only = ON")
        self._reader = await aiosqlite.connect(self.path)
        await self._reader.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pusherd-commit")

    def _checkpoint_later(self) -> None:
        """After a commit: one checkpoint CHECKPOINT_EVERY_S later, unless one is already coming.

        Scheduled by writes rather than polled: an idle daemon has no timer of its own here.
        Each wake-up of an idle process costs milliseconds of CPU on a virtual machine (its
        memory is cold), so a half-second poll alone was half the idle figure.
        """
        if not self.background or self._closing:
            return
        if self._checkpoint_at is not None or self._checkpointer is not None:
            return
        loop = asyncio.get_running_loop()
        self._checkpoint_at = loop.call_later(CHECKPOINT_EVERY_S, self._start_checkpoint)

    def _start_checkpoint(self) -> None:
        self._checkpoint_at = None
        self._checkpointer = asyncio.get_running_loop().create_task(self._checkpoint_once())

    async def _checkpoint_once(self) -> None:
        try:
            await self.checkpoint_if_written()
        except sqlite3.Error as exc:
            log.warning("checkpoint_failed", error=str(exc))
        finally:
            self._checkpointer = None
            if self._written:  # committed while it ran: the next one
                self._checkpoint_later()

    async def checkpoint_if_written(self) -> bool:
        """Checkpoint if this process has committed since the last one; whether it did.

        An idle daemon then costs no checkpoint at all (two thread hops and a WAL read every
        half second were most of what it did). Another process's writes (the CLI) leave its
        frames in the WAL until the daemon next writes: readers see them, and that process's
        own auto-checkpoint bounds the WAL.
        """
        if not self._written:
            return False
        self._written = False  # a commit while the checkpoint runs asks for the next one
        await self.checkpoint()
        return True

    async def checkpoint(self) -> None:
        """Copy committed WAL pages into the database file (PASSIVE: never blocks writers).

        The writer keeps committing meanwhile, so under a steady load the WAL is never wholly
        copied here and SQLite never starts it over: it grew by gigabytes while 100,000
        subscriptions were created, and every page read searched a longer WAL index. When
        more than WAL_RESTART_FRAMES are left, the writer copies the rest after its next
        commit (a few frames, with nothing else writing), and the write after it starts over;
        past WAL_FORCE_FRAMES it also waits for the readers of the old WAL (RESTART).
        """
        if self._reader is None:
            return
        async with self._reader.execute("PRAGMA wal_checkpoint(PASSIVE)") as cur:
            row = await cur.fetchone()
        if row is not None and self.background and int(row[1]) >= WAL_RESTART_FRAMES:
            self._catch_up = True
            self._force_restart = int(row[1]) >= WAL_FORCE_FRAMES

    async def close(self) -> None:
        """Flush waiting writes, checkpoint, and close every connection."""
        self._closing = True  # the last commits schedule no checkpoint: close runs its own
        if self._checkpoint_at is not None:
            self._checkpoint_at.cancel()
            self._checkpoint_at = None
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            await asyncio.gather(self._checkpointer, return_exceptions=True)
            self._checkpointer = None
        while self._in_flight is not None or self._urgent or self._deferred:
            if self._in_flight is not None:
                await asyncio.gather(self._in_flight, return_exceptions=True)
            else:
                self._flush_all()
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None
        if self._writer is not None and self.background:
            with contextlib.suppress(sqlite3.Error):
                self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if self._reader is not None:
            await self._reader.close()
            self._reader = None
        for conn in (self._quick, self._writer):
            if conn is not None:
                conn.close()
        self._quick = self._writer = None

    @property
    def writer(self) -> sqlite3.Connection:
        if self._writer is None:
            raise StoreError("database is not open")
        return self._writer

    def write(
        self, fn: Callable[[sqlite3.Connection], T], *, urgent: bool = True, durable: bool = True
    ) -> asyncio.Future[T]:
        """Queue fn to run inside a group commit; the future resolves after COMMIT.

        An urgent write (ingest, API, claims) goes into the next commit. A write nobody waits
        on to answer a client (attempt records) waits up to GROUP_WINDOW_S for others to share
        its fsync; an urgent durable write arriving meanwhile takes it along. A write that need
        not survive a power loss (a lease, which at worst runs out) is committed without fsync
        when nothing durable shares its commit: WAL with synchronous=NORMAL still survives a
        crash of the process.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        if urgent:
            self._urgent.append((fn, fut, durable))
            if self._soon is None:
                self._soon = loop.call_soon(self._flush_urgent)
        else:
            self._deferred.append((fn, fut, durable))
            if self._later is None:
                self._later = loop.call_later(GROUP_WINDOW_S, self._flush_all)
        return fut

    def _flush_urgent(self) -> None:
        self._soon = None
        if self._in_flight is not None:
            return  # the commit in flight starts the next group when it is through
        batch, self._urgent = self._urgent, []
        if any(durable for _, _, durable in batch):
            # This commit pays an fsync anyway: the deferred writes share it.
            batch += self._take_deferred()
        self._commit(batch)

    def _flush_all(self) -> None:
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._in_flight is not None:
            return
        batch, self._urgent = self._urgent, []
        self._commit(batch + self._take_deferred())

    def _take_deferred(self) -> list[_Write]:
        if self._later is not None:
            self._later.cancel()
            self._later = None
        batch, self._deferred = self._deferred, []
        return batch

    def _commit(self, batch: list[_Write]) -> None:
        if not batch:
            return
        durable = any(d for _, _, d in batch)
        conn = self.writer
        self._written = True
        self._checkpoint_later()
        results: list[tuple[bool, Any]] = []
        try:
            if not durable:
                conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            for fn, _, _ in batch:
                conn.execute("SAVEPOINT w")
                try:
                    results.append((True, fn(conn)))
                    conn.execute("RELEASE w")
                except Exception as exc:
                    conn.execute("ROLLBACK TO w")
                    conn.execute("RELEASE w")
                    if isinstance(exc, sqlite3.Error):
                        # The database refused the write (disk full, I/O error): 503, not 500.
                        exc = StoreError(f"could not write: {exc}")
                    results.append((False, exc))
            if not durable:
                conn.execute("COMMIT")  # no fsync: cheaper than a hop to the syncer thread
                conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            self._failed(batch, exc)
            return
        if not durable:
            self._settle(batch, results)
            return
        loop = asyncio.get_running_loop()
        assert self._syncer is not None
        self._in_flight = loop.run_in_executor(self._syncer, _commit_now, conn)

        def committed(done: asyncio.Future[Any]) -> None:
            self._in_flight = None
            exc = done.exception()
            if exc is not None:
                self._failed(batch, exc)
            else:
                self._settle(batch, results)
            if self._catch_up and not self._closing:
                self._finish_checkpoint(conn)
            else:
                self._next_group()

        self._in_flight.add_done_callback(committed)

    def _finish_checkpoint(self, conn: sqlite3.Connection) -> None:
        """The rest of a checkpoint, by the writer on its thread; the next group waits for it."""
        self._catch_up = False
        assert self._syncer is not None
        self._in_flight = asyncio.get_running_loop().run_in_executor(
            self._syncer, _checkpoint_writer, conn, self._force_restart
        )

        def finished(done: asyncio.Future[None]) -> None:
            self._in_flight = None
            exc = done.exception()
            if exc is not None:
                log.warning("checkpoint_failed", error=str(exc))
            self._next_group()

        self._in_flight.add_done_callback(finished)

    def _next_group(self) -> None:
        """After a commit on the syncer thread: the writes that queued up meanwhile."""
        if self._urgent and not any(d for _, _, d in self._urgent):
            # Leases waiting for this commit go first, without an fsync, so that a claim
            # never waits for two commits.
            leases, self._urgent = self._urgent, []
            self._commit(leases)
        if self._urgent or self._deferred:
            self._flush_all()  # everything that queued up meanwhile: the next group

    def _failed(self, batch: list[_Write], exc: BaseException) -> None:
        conn = self.writer
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA synchronous = FULL")
        log.error("commit_failed", error=str(exc), writes=len(batch))
        err = StoreError(f"could not commit: {exc}")
        for _, fut, _ in batch:
            if not fut.done():
                fut.set_exception(err)

    def _settle(self, batch: list[_Write], results: list[tuple[bool, Any]]) -> None:
        for (_, fut, _), (ok, value) in zip(batch, results, strict=True):
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def read_now(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        """A small indexed read of committed data, on the loop's thread (never waits a commit)."""
        if self._quick is None:
            raise StoreError("database is not open")
        return self._quick.execute(sql, tuple(params)).fetchall()

    async def read(self, sql: str, params: Iterable[Any] = ()) -> list[Any]:
        """A read that may scan many rows: runs on the reader connection's thread."""
        if self._reader is None:
            raise StoreError("database is not open")
        rows = await self._reader.execute_fetchall(sql, tuple(params))
        return list(rows)
