"""SQL of the wake-loop breaker and the daily run budgets (``run_service.wake_breaker``):
the counts a wake is checked against, the trip rows (``runs.wake_breakers``) and their
notices still to post.

Every function takes the connection of the caller's unit of work; none commits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.sql import Row, Tx, sql

#: True for an issue's activity row ``a`` (``audit.activity_log``) that clears the loop
#: trips before it: a status change, or a board user's comment or change.
STATUS_CHANGE = "(a.action = 'issue.updated' AND a.details ? 'status')"
CLEARS_LOOP_TRIP = f"""({STATUS_CHANGE}
    OR (a.actor_type = 'user' AND a.action IN ('issue.comment_added', 'issue.updated')))"""

#: The latest trip of the (agent, issue, reason), the issue's latest status change, and
#: the first board action or status change after that trip (which clears it).
_LOOP = sql(
    f"""
    WITH latest AS (
        SELECT max(b.tripped_at) AS at FROM runs.wake_breakers b
        WHERE b.agent_id = :agent AND b.kind = 'wake_loop' AND b.issue_id = :issue
          AND b.reason = :reason
    ),
    issue_activity AS (
        SELECT a.created_at, {STATUS_CHANGE} AS status_change, {CLEARS_LOOP_TRIP} AS clears
        FROM audit.activity_log a
        WHERE a.company_id = :company AND a.entity_type = 'issue'
          AND a.entity_id = CAST(:issue AS text)
    ),
    status_change AS (
        SELECT max(created_at) AS at FROM issue_activity WHERE status_change
    ),
    cleared AS (
        SELECT min(i.created_at) AS at FROM issue_activity i, latest
        WHERE i.created_at > latest.at AND i.clears
    )
    SELECT latest.at IS NOT NULL AND cleared.at IS NULL AS standing,
           (SELECT count(*) FROM runs.heartbeat_runs r
            WHERE r.agent_id = :agent AND r.issue_id = :issue AND r.wake_reason = :reason
              AND r.created_at > greatest(
                  now() - make_interval(secs => :window),
                  COALESCE(status_change.at, '-infinity'::timestamptz),
                  COALESCE(cleared.at, '-infinity'::timestamptz)
              )) AS runs
    FROM latest, status_change, cleared
    """
)
_BUDGET = sql(
    """
    SELECT a.daily_run_budget AS budget,
           (SELECT count(*) FROM runs.heartbeat_runs r
            WHERE r.agent_id = a.id
              AND r.created_at > now() - make_interval(secs => :window)) AS runs,
           (SELECT count(*) FROM runs.wake_breakers b
            WHERE b.agent_id = a.id AND b.kind = 'daily_run_budget'
              AND b.issue_id IS NOT DISTINCT FROM CAST(:issue AS uuid)
              AND b.tripped_at > now() - make_interval(secs => :window)) AS trips
    FROM runs.agents a WHERE a.id = :agent
    """
)
_INSERT_TRIP = sql(
    """
    INSERT INTO runs.wake_breakers
        (company_id, agent_id, issue_id, kind, reason, runs, window_seconds)
    VALUES (:company, :agent, :issue, :kind, :reason, :runs, :window)
    RETURNING id
    """
)
_PENDING = sql(
    """
    SELECT b.id, b.issue_id, b.kind, b.reason, b.runs, b.window_seconds, a.name AS agent_name
    FROM runs.wake_breakers b JOIN runs.agents a ON a.id = b.agent_id
    WHERE b.announced_at IS NULL AND b.issue_id IS NOT NULL
    ORDER BY b.tripped_at
    LIMIT :limit
    FOR UPDATE OF b SKIP LOCKED
    """
)
_ANNOUNCED = sql("UPDATE runs.wake_breakers SET announced_at = now() WHERE id = :id")


async def loop_state(
    tx: Tx, *, company_id: object, agent_id: object, issue_id: object, reason: str, window: int
) -> Row:
    """(standing, runs): whether a loop trip of the (agent, issue, reason) stands, and
    its runs for that reason within ``window`` seconds since the issue's last status
    change and since the trip was cleared."""
    row = await tx.fetchrow(
        _LOOP,
        {
            "company": company_id,
            "agent": agent_id,
            "issue": issue_id,
            "reason": reason,
            "window": window,
        },
    )
    assert row is not None
    return row


async def budget_state(tx: Tx, *, agent_id: object, issue_id: object, window: int) -> Row | None:
    """(budget, runs, trips): the agent's daily run budget, its runs and its budget trips
    on the issue within ``window`` seconds; None when the agent is gone."""
    return await tx.fetchrow(_BUDGET, {"agent": agent_id, "issue": issue_id, "window": window})


async def insert_trip(tx: Tx, trip: Mapping[str, Any]) -> object:
    """Insert a trip row (company, agent, issue, kind, reason, runs, window); its id."""
    return await tx.fetchval(_INSERT_TRIP, trip)


async def pending_trips(tx: Tx, limit: int) -> list[Row]:
    """Up to ``limit`` trips on an issue not announced yet, oldest first, locked FOR
    UPDATE SKIP LOCKED, with their agent's name."""
    return await tx.fetch(_PENDING, {"limit": limit})


async def mark_announced(tx: Tx, trip_id: object) -> None:
    """Record that the trip's notice was posted (or its issue is gone)."""
    await tx.execute(_ANNOUNCED, {"id": trip_id})
