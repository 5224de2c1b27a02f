"""A crash-safe log in front of Temporal: answer once on disk, start later.

With ``MIRRORFLOW_INTAKE=log`` the webhook appends every accepted
notification to an :class:`IntakeLog`, a SQLite file in WAL mode, and answers
200 once the transaction holding it is committed with ``synchronous=FULL``.
One writer task gathers the appends of every request waiting at that moment
into one transaction, so that one fsync covers them all.

A :class:`Forwarder` in the same process starts the workflows from the log,
oldest first, as fast as Temporal accepts them, and deletes each row once
Temporal has accepted its start. While Temporal refuses or does not answer,
it backs off and tries the oldest row alone until one start succeeds. What a
crash leaves in the log is forwarded when the process starts again; a
notification forwarded twice has one workflow id, which Temporal folds into
one run.

Every SQLite call runs on one thread of the log's own, never on the event
loop. docs/intake.md explains the decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import structlog

from mirrorflow.files import create_owner_only
from webhook.metrics import WebhookMetrics
from workflows.models import Notification

log: structlog.stdlib.BoundLogger = structlog.get_logger("webhook.intake")

T = TypeVar("T")

StartWorkflow = Callable[[Notification, str], Awaitable[bool]]
"""Start a notification's workflow by id; return whether a new run began."""

READ_BATCH = 256
"""Rows the forwarder reads from the log at a time."""

FIRST_BACKOFF = 0.1
MAX_BACKOFF = 5.0
"""Seconds the forwarder waits after a refused start, doubling up to the max."""

IDLE_POLL = 1.0
"""Seconds the forwarder waits for new rows before looking again anyway."""

BUSY_PAUSE = 0.02
"""Seconds between two starts while the webhook is busy answering."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS intake (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    workflow_id TEXT NOT NULL,
    notification BLOB NOT NULL,
    arrived REAL NOT NULL
)
"""
# AUTOINCREMENT keeps ids growing after the table empties, which the
# forwarder's cursor relies on.


_ROWS_PER_STATEMENT = 250
"""Rows one INSERT or DELETE statement covers.

One statement per group rather than one per row: the log's thread gives up
the GIL around every SQLite step and waits for the busy event loop to hand
it back, so steps, not rows, are what a commit costs. 250 rows of three
values stay within the 999 variables of SQLite's most modest builds.
"""


# Only placeholders are joined into these statements; the values are bound.
@functools.cache
def _insert(rows: int) -> str:
    values = ", ".join(["(?, ?, ?)"] * rows)
    columns = "(workflow_id, notification, arrived)"
    return f"INSERT INTO intake {columns} VALUES {values}"  # noqa: S608


@functools.cache
def _delete(rows: int) -> str:
    placeholders = ", ".join(["?"] * rows)
    return f"DELETE FROM intake WHERE id IN ({placeholders})"  # noqa: S608


def _chunks(items: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class IntakeError(Exception):
    """The intake log cannot take a notification now; the webhook answers 503."""

    reason = "intake_unavailable"
    """The rejection reason the webhook counts this error under."""


class IntakeFull(IntakeError):
    """The log holds as many rows or bytes as it may until Temporal catches up."""

    reason = "intake_full"


@dataclass(frozen=True, slots=True)
class Entry:
    """One notification in the log, waiting for Temporal to accept its start."""

    id: int
    workflow_id: str
    notification: Notification
    arrived: float
    size: int


@dataclass(frozen=True, slots=True)
class Backlog:
    """What the log holds that Temporal has not accepted yet."""

    rows: int
    bytes: int
    oldest_age: float
    """Seconds since the oldest row arrived; 0 when the log is empty."""


@dataclass(slots=True)
class _Append:
    workflow_id: str
    data: bytes
    arrived: float
    committed: asyncio.Future[None]


class IntakeLog:
    """A SQLite log of notifications that Temporal has not accepted yet.

    Args:
        path: the log file; its folder is created if missing, and a
            ``<name>.lock`` file beside it keeps other processes out.
        max_rows: rows the log may hold before :meth:`append` refuses.
        max_bytes: bytes of notifications it may hold before refusing.
        metrics: where commits and appends are counted.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_rows: int,
        max_bytes: int,
        metrics: WebhookMetrics,
    ) -> None:
        self.path = path
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.rows = 0
        self.bytes = 0
        self.new_rows = asyncio.Event()
        """Set when rows may have come that the forwarder has not read."""

        self._metrics = metrics
        self._thread: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None
        self._lock: IO[bytes] | None = None
        self._appends: list[_Append] = []
        self._forwarded: list[int] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    def __repr__(self) -> str:
        return (
            f"IntakeLog(path={str(self.path)!r}, rows={self.rows}, "
            f"max_rows={self.max_rows}, max_bytes={self.max_bytes})"
        )

    @property
    def is_open(self) -> bool:
        """Return whether the log takes appends."""
        return self._writer is not None and not self._closing

    @property
    def is_full(self) -> bool:
        """Return whether the log is at its size limit."""
        return self.rows >= self.max_rows or self.bytes >= self.max_bytes

    async def open(self) -> None:
        """Open or create the log, lock it for this process, start the writer.

        Raises:
            IntakeError: another process holds the log.
            sqlite3.Error: the file cannot be opened as a SQLite database.
        """
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake")
        try:
            await self._call(self._open)
        except BaseException:
            self._thread.shutdown(wait=False)
            self._thread = None
            raise

        self._closing = False
        self._writer = asyncio.create_task(self._write_loop(), name="intake-writer")
        log.info(
            "intake_opened",
            path=str(self.path),
            backlog=self.rows,
            backlog_bytes=self.bytes,
        )

    async def append(self, workflow_id: str, notification_json: str) -> None:
        """Add a notification to the log; return once it is committed to disk.

        ``notification_json`` is the notification as
        :func:`~workflows.models.canonical_json` writes it.

        Raises:
            IntakeFull: the log is at its size limit.
            IntakeError: the log is not open, or the commit failed.
        """
        if not self.is_open:
            raise IntakeError("The intake log is not open; try again later.")
        data = notification_json.encode()
        if self.rows >= self.max_rows or self.bytes + len(data) > self.max_bytes:
            raise IntakeFull(
                f"The webhook holds {self.rows} notifications that Temporal has "
                "not accepted yet, as many as it may; try again later."
            )

        self.rows += 1
        self.bytes += len(data)
        committed = asyncio.get_running_loop().create_future()
        self._appends.append(_Append(workflow_id, data, time.time(), committed))
        self._wake.set()

        await committed

    async def read_after(self, cursor: int, limit: int) -> list[Entry]:
        """Return up to ``limit`` rows with ids above ``cursor``, oldest first."""
        return await self._call(self._read_after, cursor, limit)

    def mark_forwarded(self, entry: Entry) -> None:
        """Delete a row whose start Temporal accepted, with the next commit."""
        self.rows -= 1
        self.bytes -= entry.size
        self._forwarded.append(entry.id)
        self._wake.set()

    async def backlog(self) -> Backlog:
        """Return how much the log holds and the age of its oldest row.

        A row Temporal has accepted is not counted, though its deletion may
        wait for the next commit.
        """
        # Deletions already handed to the writer commit before this query
        # runs (the log has one thread); those still queued are skipped.
        oldest = await self._call(self._oldest_arrival, frozenset(self._forwarded))
        if self.rows == 0 or oldest is None:
            age = 0.0
        else:
            age = max(0.0, time.time() - oldest)

        return Backlog(rows=self.rows, bytes=self.bytes, oldest_age=age)

    async def close(self) -> None:
        """Commit what is pending, stop the writer and close the file."""
        if self._writer is not None:
            self._closing = True
            self._wake.set()
            await self._writer
            self._writer = None
        if self._thread is not None:
            await self._call(self._close)
            self._thread.shutdown(wait=False)
            self._thread = None

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            appends, self._appends = self._appends, []
            forwarded, self._forwarded = self._forwarded, []
            if appends or forwarded:
                await self._commit(appends, forwarded)
            if self._closing and not self._appends and not self._forwarded:
                return

    async def _commit(self, appends: list[_Append], forwarded: list[int]) -> None:
        rows = [(a.workflow_id, a.data, a.arrived) for a in appends]
        try:
            await self._call(self._write, rows, forwarded)
        except sqlite3.Error as exc:
            log.error(
                "intake_commit_failed",
                error=f"{type(exc).__name__}: {exc}",
                appends=len(appends),
                path=str(self.path),
            )
            self.rows -= len(appends)
            self.bytes -= sum(len(a.data) for a in appends)
            # Deleting them again later is harmless; forgetting would not be.
            self._forwarded[:0] = forwarded
            for append in appends:
                if not append.committed.done():
                    append.committed.set_exception(
                        IntakeError(
                            "The notification could not be written to disk; "
                            "try again later."
                        )
                    )
            return

        self._metrics.intake_commits.inc()
        self._metrics.intake_appended.inc(len(appends))
        for append in appends:
            # A request cancelled meanwhile (its deadline passed) had its 503.
            if not append.committed.done():
                append.committed.set_result(None)
        if appends:
            self.new_rows.set()

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        assert self._thread is not None, "the intake log is not open"
        loop = asyncio.get_running_loop()

        return await loop.run_in_executor(
            self._thread, functools.partial(function, *args)
        )

    # What follows runs on the log's thread only.

    def _open(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        for path in (self.path, lock_path):
            create_owner_only(path)
        lock = lock_path.open("ab")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise IntakeError(
                f"The intake log {str(self.path)!r} is in use by another process; "
                "give each webhook process a log of its own "
                "(MIRRORFLOW_INTAKE_PATH)."
            ) from None

        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            [mode] = db.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode != "wal":
                raise IntakeError(
                    f"The intake log {str(self.path)!r} cannot use SQLite's WAL "
                    f"mode (got {mode!r}); put it on a local file system."
                )
            # FULL syncs the WAL at every commit: a 200 survives a power cut.
            db.execute("PRAGMA synchronous=FULL")
            db.execute(_SCHEMA)
            rows, size = db.execute(
                "SELECT count(*), coalesce(sum(length(notification)), 0) FROM intake"
            ).fetchone()
        except BaseException:
            db.close()
            lock.close()
            raise

        self._db, self._lock = db, lock
        self.rows, self.bytes = rows, size

    def _write(
        self, rows: list[tuple[str, bytes, float]], forwarded: list[int]
    ) -> None:
        assert self._db is not None
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for chunk in _chunks(rows, _ROWS_PER_STATEMENT):
                db.execute(_insert(len(chunk)), [v for row in chunk for v in row])
            for ids in _chunks(forwarded, _ROWS_PER_STATEMENT):
                db.execute(_delete(len(ids)), ids)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _read_after(self, cursor: int, limit: int) -> list[Entry]:
        assert self._db is not None
        rows = self._db.execute(
            "SELECT id, workflow_id, notification, arrived FROM intake "
            "WHERE id > ? ORDER BY id LIMIT ?",
            (cursor, limit),
        ).fetchall()

        return [
            Entry(
                id=row_id,
                workflow_id=workflow_id,
                notification=Notification.model_validate_json(data),
                arrived=arrived,
                size=len(data),
            )
            for row_id, workflow_id, data, arrived in rows
        ]

    def _oldest_arrival(self, forwarded: frozenset[int]) -> float | None:
        assert self._db is not None
        rows = self._db.execute("SELECT id, arrived FROM intake ORDER BY id")
        try:
            # Only the rows forwarded since the last commit are read past.
            for row_id, arrived in rows:
                if row_id not in forwarded:
                    return float(arrived)
        finally:
            rows.close()

        return None

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None


class Forwarder:
    """Start the workflows of logged notifications, then delete their rows.

    Args:
        intake: the open log to forward from.
        start: starts one notification's workflow; raises when Temporal does
            not accept the start.
        concurrency: starts in flight at once.
        rate: starts begun per second at most; None for as fast as Temporal
            accepts them.
        metrics: where forwarded notifications and refusals are counted.
        busy: tells whether requests are piling up in the webhook. While
            they are, the forwarder starts one workflow at a time, a pause
            apart: answering Mirror comes first, and every start costs CPU
            in this process and in Temporal, which may share the machine.
    """

    def __init__(
        self,
        intake: IntakeLog,
        start: StartWorkflow,
        *,
        concurrency: int,
        metrics: WebhookMetrics,
        rate: float | None = None,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self._intake = intake
        self._start = start
        self._metrics = metrics
        self._busy = busy
        self._slots = asyncio.Semaphore(concurrency)
        self._interval = 1 / rate if rate else 0.0
        self._next_start = 0.0
        self._cursor = 0
        self._retry: list[Entry] = []
        self._in_flight: set[asyncio.Task[bool]] = set()
        self._backoff = 0.0
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        """Why Temporal refused the last start, while it keeps refusing."""

    def __repr__(self) -> str:
        return f"Forwarder(intake={self._intake!r}, backoff={self._backoff:g})"

    @property
    def is_failing(self) -> bool:
        """Return whether Temporal refused the last start."""
        return self._backoff > 0

    def start(self) -> None:
        """Start forwarding in the background, beginning with what was left."""
        self._task = asyncio.create_task(self._run(), name="intake-forwarder")

    async def stop(self) -> None:
        """Stop forwarding; starts in flight are cancelled and tried next time."""
        tasks: list[asyncio.Task[Any]] = [*self._in_flight]
        if self._task is not None:
            tasks.append(self._task)
            self._task = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            entries = await self._next_entries()
            if self._backoff:
                await asyncio.sleep(self._backoff)
                # Try the oldest alone, so that a Temporal that is down costs
                # one failed start per backoff rather than one per row.
                head, entries = entries[0], entries[1:]
                await self._pace()
                if not await self._forward(head):
                    self._retry.extend(entries)
                    continue

            for index, entry in enumerate(entries):
                paced = self._busy()
                if paced:
                    await asyncio.sleep(BUSY_PAUSE)
                await self._pace()
                await self._slots.acquire()
                if self._backoff:
                    self._slots.release()
                    self._retry.extend(entries[index:])
                    break
                if paced:
                    await self._forward_in_slot(entry)
                    continue
                task = asyncio.create_task(self._forward_in_slot(entry))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
                # One start begins per turn of the event loop, between the
                # requests, rather than a batch of them all at once.
                await asyncio.sleep(0)

    async def _pace(self) -> None:
        """Wait for the next start's turn under the rate limit, if any."""
        if not self._interval:
            return
        now = time.monotonic()
        wait = self._next_start - now
        # Reserve the turn before sleeping, counted from the turn before it
        # rather than from the wake-up, so that timer slack does not lower
        # the rate.
        self._next_start = max(self._next_start, now) + self._interval
        if wait > 0:
            await asyncio.sleep(wait)

    async def _next_entries(self) -> list[Entry]:
        while True:
            if self._retry:
                entries = sorted(self._retry, key=lambda entry: entry.id)
                self._retry = []
                return entries

            self._intake.new_rows.clear()
            entries = await self._intake.read_after(self._cursor, READ_BATCH)
            if entries:
                self._cursor = entries[-1].id
                return entries
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_POLL):
                    await self._intake.new_rows.wait()

    async def _forward_in_slot(self, entry: Entry) -> bool:
        try:
            return await self._forward(entry)
        finally:
            self._slots.release()

    async def _forward(self, entry: Entry) -> bool:
        """Start one entry's workflow; return whether Temporal accepted it."""
        try:
            is_new = await self._start(entry.notification, entry.workflow_id)
        except Exception as exc:
            self._metrics.intake_forward_failures.inc()
            self.last_error = f"{type(exc).__name__}: {exc}"
            if not self._backoff:
                log.warning(
                    "intake_forwarding_paused",
                    error=self.last_error,
                    workflow_id=entry.workflow_id,
                    backlog=self._intake.rows,
                )
            self._backoff = min(max(2 * self._backoff, FIRST_BACKOFF), MAX_BACKOFF)
            self._retry.append(entry)
            self._intake.new_rows.set()
            return False

        if self._backoff:
            log.info("intake_forwarding_resumed", backlog=self._intake.rows)
            self._backoff = 0.0
            self.last_error = None
        self._intake.mark_forwarded(entry)
        self._metrics.intake_forwarded.inc()
        if is_new:
            self._metrics.workflows_started.inc()
        else:
            self._metrics.duplicates.inc()
        notification = entry.notification
        log.info(
            "notification_forwarded",
            outcome="started" if is_new else "duplicate",
            waited_ms=round(max(0.0, time.time() - entry.arrived) * 1000, 1),
            workflow_id=entry.workflow_id,
            user_token=notification.user_token,
            collection=notification.collection,
            operation=notification.operation,
            item_id=notification.item_id,
        )

        return True
