"""Queued runs too old to wait any longer: the pass's lock and the expired runs."""

from __future__ import annotations

from common.sql import Row, Tx, sql

_TRY_LOCK = sql("SELECT pg_try_advisory_xact_lock(hashtextextended(:lock, 0))")
_EXPIRED = sql(
    """
    SELECT id, issue_id FROM runs.heartbeat_runs
    WHERE status = 'queued' AND created_at < now() - make_interval(secs => :max)
    ORDER BY created_at
    LIMIT :limit
    """
)


async def try_pass_lock(tx: Tx, key: str) -> bool:
    """Take the pass's transaction-level advisory lock if it is free."""
    return bool(await tx.fetchval(_TRY_LOCK, {"lock": key}))


async def expired_queued_runs(tx: Tx, *, max_queued_seconds: int, limit: int) -> list[Row]:
    """The runs ``queued`` for longer than ``max_queued_seconds``, oldest first (at most
    ``limit``): id, issue_id."""
    return await tx.fetch(_EXPIRED, {"max": max_queued_seconds, "limit": limit})
