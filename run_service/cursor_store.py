"""SQL of the outbox consumers' cursors (``runs.consumer_cursors``): one row per
consumer, the id of the last issue event it consumed.

Every function takes the connection of the caller's unit of work; none commits.
"""

from __future__ import annotations

from common.sql import Tx, sql

_ENSURE_CURSOR = sql(
    "INSERT INTO runs.consumer_cursors (consumer) VALUES (:c) ON CONFLICT (consumer) DO NOTHING"
)
_LOCK_CURSOR = sql(
    """
    SELECT last_event_id FROM runs.consumer_cursors WHERE consumer = :c
    FOR UPDATE SKIP LOCKED
    """
)
_ADVANCE = sql(
    """
    UPDATE runs.consumer_cursors SET last_event_id = :id, updated_at = now()
    WHERE consumer = :c
    """
)


async def lock_cursor(tx: Tx, consumer: str) -> int | None:
    """The consumer's cursor, its row created if missing and locked FOR UPDATE SKIP
    LOCKED; None while another transaction holds it."""
    await tx.execute(_ENSURE_CURSOR, {"c": consumer})
    cursor = await tx.fetchval(_LOCK_CURSOR, {"c": consumer})
    return None if cursor is None else int(cursor)


async def advance_cursor(tx: Tx, consumer: str, event_id: int) -> None:
    """Move the consumer's (locked) cursor to ``event_id``."""
    await tx.execute(_ADVANCE, {"c": consumer, "id": event_id})
