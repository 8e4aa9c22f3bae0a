"""Timer wakes: the tick's lock, the agents whose interval has elapsed, and the
compare-and-set that moves an agent's timer base (``agent_runtime_state``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from common.sql import Row, Tx, sql

#: The SQL twin of :func:`run_service.timers.jitter_seconds`.
_JITTER_SQL = (
    "(('x' || substr(md5(a.id::text), 1, 8))::bit(32)::bigint"
    " % GREATEST(1, a.heartbeat_interval_seconds / 10))"
)

_TRY_LOCK = sql("SELECT pg_try_advisory_xact_lock(hashtextextended(:key, 0))")
_DUE = sql(
    f"""
    SELECT a.id, s.last_heartbeat_at AS last,
           COALESCE(s.last_heartbeat_at, a.created_at) AS base
    FROM runs.agents a
    LEFT JOIN runs.agent_runtime_state s ON s.agent_id = a.id
    WHERE a.status = 'active' AND a.heartbeat_interval_seconds > 0
      AND (CAST(:companies AS uuid[]) IS NULL OR a.company_id = ANY(CAST(:companies AS uuid[])))
      AND COALESCE(s.last_heartbeat_at, a.created_at)
          + make_interval(secs => a.heartbeat_interval_seconds + {_JITTER_SQL}) <= now()
    ORDER BY COALESCE(s.last_heartbeat_at, a.created_at)
          + make_interval(secs => a.heartbeat_interval_seconds + {_JITTER_SQL})
    LIMIT :limit
    """
)
#: Moves the agent's base to now iff it is still the value the tick read.
_CLAIM = sql(
    """
    INSERT INTO runs.agent_runtime_state AS s (agent_id, last_heartbeat_at, updated_at)
    VALUES (:agent, now(), now())
    ON CONFLICT (agent_id) DO UPDATE
    SET last_heartbeat_at = now(), updated_at = now()
    WHERE s.last_heartbeat_at IS NOT DISTINCT FROM CAST(:last AS timestamptz)
    RETURNING 1
    """
)


async def try_tick_lock(tx: Tx, key: str) -> bool:
    """Take the tick's transaction-level advisory lock if it is free."""
    return bool(await tx.fetchval(_TRY_LOCK, {"key": key}))


async def due_agents(tx: Tx, *, companies: Sequence[str] | None, limit: int) -> list[Row]:
    """The active agents whose timer is due, the most overdue first (at most ``limit``;
    ``companies``: only those, None: every company): id, last (their
    ``last_heartbeat_at``), base (the time their interval counts from)."""
    return await tx.fetch(
        _DUE, {"companies": None if companies is None else list(companies), "limit": limit}
    )


async def claim_timer_slot(tx: Tx, agent_id: str, last: datetime | None) -> bool:
    """Move the agent's ``last_heartbeat_at`` to now iff it is still ``last``."""
    return await tx.fetchval(_CLAIM, {"agent": agent_id, "last": last}) is not None
