"""Retention sweeps: delete what is no longer needed, a bounded batch at a time.

Each service owns the policies of its tables (``run_service.retention``,
``issue_service.retention``, ``workspace_service.retention``): a policy names its
table, how long rows are kept once no longer needed, and one *step*, a statement that
deletes at most ``limit`` expired rows. ``sweep`` runs the policies in order:

- one replica at a time: a session-level advisory lock taken with try-lock on a
  connection held outside any transaction for the sweep; a replica that does not get
  it skips the sweep;
- every step is its own short transaction, at most ``limit`` rows, with a pause
  between two steps, so no lock is held long and vacuum can follow;
- one log line per table per sweep (rows deleted, batches, seconds) and Prometheus
  metrics: ``paperclip_retention_rows_deleted_total{table}``,
  ``paperclip_retention_batches_total{table}``, ``paperclip_retention_sweep_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from prometheus_client import Counter, Histogram

from common.config import Settings
from common.db import Database
from common.sql import Query, Tx

log = logging.getLogger("paperclip.retention")

ROWS_DELETED = Counter(
    "paperclip_retention_rows_deleted_total", "Rows deleted by retention sweeps", ["table"]
)
BATCHES = Counter(
    "paperclip_retention_batches_total", "DELETE statements run by retention sweeps", ["table"]
)
SWEEP_SECONDS = Histogram(
    "paperclip_retention_sweep_seconds", "Duration of one table's retention sweep", ["table"]
)

_TRY_LOCK = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"
_UNLOCK = "SELECT pg_advisory_unlock(hashtextextended($1, 0))"

#: Where a keyset step resumes (None: from the start).
Cursor = tuple[Any, ...] | None


@dataclass(frozen=True)
class Step:
    """What one batch did: rows deleted, and where the next batch resumes (``done``:
    nothing more to look at in this sweep)."""

    deleted: int
    done: bool
    cursor: Cursor = None


#: One batch: (transaction, rows at most, cutoff, cursor) -> what it did.
StepFn = Callable[[Tx, int, datetime, Cursor], Awaitable[Step]]


@dataclass(frozen=True)
class Policy:
    """The retention rule of one table (or one part of it)."""

    #: The metric and log label, e.g. ``runs.run_events``.
    table: str
    #: Rows no longer needed are kept this long (None: kept for ever).
    keep: timedelta | None
    step: StepFn
    #: Tells apart two policies of one table in logs (e.g. ``skipped``).
    part: str = ""

    @property
    def label(self) -> str:
        return f"{self.table}:{self.part}" if self.part else self.table


def days(value: int) -> timedelta | None:
    """A horizon setting in days (0: kept for ever)."""
    return timedelta(days=value) if value > 0 else None


def counting(
    statement: Query, params: Mapping[str, Any] | None = None, *, until_empty: bool = False
) -> StepFn:
    """A step from a statement that deletes at most ``:limit`` rows older than
    ``:cutoff`` and returns the number deleted; done when it deleted fewer (with
    ``until_empty``, none: for a table whose rows reference each other, where a
    parent becomes deletable once the batch before deleted its children)."""
    extra = dict(params or {})

    async def step(tx: Tx, limit: int, cutoff: datetime, cursor: Cursor) -> Step:
        del cursor
        deleted = int(await tx.fetchval(statement, {**extra, "limit": limit, "cutoff": cutoff}))
        return Step(deleted, done=deleted == 0 if until_empty else deleted < limit)

    return step


@dataclass
class TableResult:
    """One policy's part of a sweep."""

    label: str
    deleted: int = 0
    batches: int = 0
    seconds: float = 0.0
    #: The duration of each batch, in order.
    batch_seconds: list[float] = field(default_factory=list)


@dataclass
class SweepResult:
    """What a sweep did, per policy; ``ran`` is False when another replica swept."""

    ran: bool = True
    tables: list[TableResult] = field(default_factory=list)

    def deleted(self, label: str) -> int:
        return sum(t.deleted for t in self.tables if t.label == label)

    def batches(self, label: str) -> int:
        return sum(t.batches for t in self.tables if t.label == label)


@asynccontextmanager
async def session_lock(db: Database, key: str) -> AsyncIterator[bool]:
    """Try the session advisory lock ``key`` on a connection kept outside any
    transaction; yields whether it was taken (and holds it until the block ends)."""
    async with db.engine.connect() as conn:
        pooled = await conn.get_raw_connection()
        driver: asyncpg.Connection = pooled.driver_connection  # type: ignore[assignment]
        if not await driver.fetchval(_TRY_LOCK, key):
            yield False
            return
        try:
            yield True
        finally:
            # A closed session releases its locks: a failed unlock drops the connection.
            try:
                await driver.execute(_UNLOCK, key)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                await conn.invalidate()
            except asyncio.CancelledError:
                await conn.invalidate()
                raise


async def run_policy(
    db: Database,
    policy: Policy,
    *,
    batch: int,
    pause: float,
    now: datetime | None = None,
) -> TableResult:
    """Delete the expired rows of ``policy``, one bounded transaction per batch."""
    result = TableResult(policy.label)
    if policy.keep is None:
        return result
    cutoff = (now or datetime.now(UTC)) - policy.keep
    started = time.monotonic()
    cursor: Cursor = None
    while True:
        begun = time.monotonic()
        async with db.unit_of_work() as tx:
            step = await policy.step(tx, batch, cutoff, cursor)
        result.batch_seconds.append(time.monotonic() - begun)
        result.batches += 1
        result.deleted += step.deleted
        BATCHES.labels(policy.table).inc()
        ROWS_DELETED.labels(policy.table).inc(step.deleted)
        if step.done:
            break
        cursor = step.cursor
        if pause > 0:
            await asyncio.sleep(pause)
    result.seconds = time.monotonic() - started
    SWEEP_SECONDS.labels(policy.table).observe(result.seconds)
    log.info(
        "retention swept %s: %d rows in %d batches, %.3f s",
        policy.label,
        result.deleted,
        result.batches,
        result.seconds,
        extra={
            "table": policy.label,
            "deleted": result.deleted,
            "batches": result.batches,
            "seconds": round(result.seconds, 3),
        },
    )
    return result


async def sweep(
    db: Database,
    policies: Sequence[Policy],
    *,
    lock_key: str,
    batch: int,
    pause: float,
    now: datetime | None = None,
) -> SweepResult:
    """Run ``policies`` in order under the advisory lock ``lock_key``; nothing (``ran``
    False) when another replica holds it."""
    async with session_lock(db, lock_key) as got:
        if not got:
            return SweepResult(ran=False)
        result = SweepResult()
        for policy in policies:
            result.tables.append(await run_policy(db, policy, batch=batch, pause=pause, now=now))
        return result


async def sweep_forever(
    db: Database,
    policies: Callable[[], Sequence[Policy]],
    *,
    lock_key: str,
    interval: float,
    batch: int,
    pause: float,
) -> None:
    """Sweep every ``interval`` seconds until cancelled (``interval`` 0: never);
    failures are logged, never fatal."""
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            await sweep(db, policies(), lock_key=lock_key, batch=batch, pause=pause)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("retention sweep failed")


async def sweep_by_settings(
    db: Database,
    settings: Settings,
    policies: Callable[[Settings], Sequence[Policy]],
    *,
    lock_key: str,
) -> None:
    """:func:`sweep_forever` with the interval, batch and pause of ``settings``."""
    await sweep_forever(
        db,
        lambda: policies(settings),
        lock_key=lock_key,
        interval=settings.retention_sweep_seconds,
        batch=settings.retention_batch_rows,
        pause=settings.retention_batch_pause_seconds,
    )
