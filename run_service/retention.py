"""Retention of the run service's tables (README "Retention"; ``common.retention``).

In sweep order:

=========================  ==================================================  =======
table                      deleted                                             default
=========================  ==================================================  =======
``runs.run_events``        events of runs finished longer ago than the         14 days
                           horizon
``runs.wakeup_requests``   ``skipped`` and ``coalesced`` wakes                 3 days
``runs.wakeup_requests``   ``completed``, ``failed`` and ``cancelled`` wakes   30 days
``runs.wake_breakers``     trips that no longer decide anything: a budget      30 days
                           trip, a loop trip a later trip of its (agent,
                           issue, reason) supersedes, a loop trip cleared
                           longer ago than the longest loop window
``runs.heartbeat_runs``    runs finished longer ago than the horizon (their    30 days
                           remaining events go with them)
=========================  ==================================================  =======

Never deleted, whatever their age: anything of a ``queued`` or ``running`` run; a run
(and its events) an issue still names as ``checkout_run_id`` or ``execution_run_id``;
``queued``, ``claimed`` and ``deferred`` wakes and the wake a live run was started
for; a run another run retries (``retry_of_run_id``, a foreign key) or a kept wake
names (``run_id``, a foreign key); a run an active environment lease names; the latest
run of each (issue, agent) pair while the issue is open (stranded-issue reconciliation
decides on it); a trip whose comment is still to be posted, and the latest loop trip of
an (agent, issue, reason) until it was cleared (``run_service.wake_breaker``: it stands,
and the runs counted after it start when it was cleared).

Run events are walked by run, in ``finished_at`` order behind a cursor, so runs whose
events are gone are not read again within a sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from common.config import WAKE_LOOP_WINDOW_MAX_SECONDS, Settings
from common.db import Database
from common.retention import Cursor, Policy, Step, counting, days, sweep_by_settings
from common.sql import Tx, sql
from run_service.foreign_reads import (
    ACTIVE_LEASE_OF_RUN,
    REFERENCED_BY_ISSUE,
    RUN_ISSUE_OPEN,
)
from run_service.wake_breaker import BUDGET_WINDOW_SECONDS
from run_service.wake_breaker_store import CLEARS_LOOP_TRIP

LOCK_KEY = "run_service.retention"
TERMINAL = "('succeeded', 'failed', 'cancelled', 'timed_out')"
_START: tuple[Any, ...] = (datetime(1970, 1, 1, tzinfo=UTC), "00000000-0000-0000-0000-000000000000")

RUN_EVENTS = sql(
    f"""
    WITH chunk AS (
        SELECT r.id, r.finished_at FROM runs.heartbeat_runs r
        WHERE r.status IN {TERMINAL} AND r.finished_at < :cutoff
          AND (r.finished_at, r.id) > (:after_at, :after_id::uuid)
        ORDER BY r.finished_at, r.id
        LIMIT :limit
    ),
    eligible AS (
        SELECT c.id FROM chunk c
        WHERE NOT ({REFERENCED_BY_ISSUE.format(run="c.id")})
    ),
    gone AS (
        DELETE FROM runs.run_events
        WHERE ctid = ANY(ARRAY(
            SELECT e.ctid FROM eligible c
            CROSS JOIN LATERAL (
                SELECT ctid FROM runs.run_events WHERE run_id = c.id) e
            LIMIT :limit))
        RETURNING 1
    ),
    last AS (SELECT id, finished_at FROM chunk ORDER BY finished_at DESC, id DESC LIMIT 1)
    SELECT (SELECT count(*) FROM gone) AS deleted,
           (SELECT count(*) FROM chunk) AS runs,
           (SELECT finished_at FROM last) AS last_at,
           (SELECT id::text FROM last) AS last_id
    """
)

_WAKES = """
    WITH victims AS (
        SELECT w.id FROM runs.wakeup_requests w
        WHERE w.status IN {statuses} AND w.requested_at < :cutoff
          AND (w.finished_at IS NULL OR w.finished_at < :cutoff)
          AND NOT EXISTS (
              SELECT 1 FROM runs.heartbeat_runs r
              WHERE r.wakeup_request_id = w.id AND r.status IN ('queued', 'running'))
        ORDER BY w.requested_at
        LIMIT :limit
        FOR UPDATE OF w SKIP LOCKED
    ),
    gone AS (
        DELETE FROM runs.wakeup_requests w USING victims v WHERE w.id = v.id RETURNING 1
    )
    SELECT count(*) FROM gone
"""
SKIPPED_WAKES = sql(_WAKES.format(statuses="('skipped', 'coalesced')"))
FINISHED_WAKES = sql(_WAKES.format(statuses="('completed', 'failed', 'cancelled')"))

#: Trips that decide nothing any more. ``run_service.wake_breaker`` reads the latest loop
#: trip of an (agent, issue, reason) and the first activity clearing it, which bounds
#: the runs it counts while that is within the loop window; and the budget trips of the
#: last 24 hours.
WAKE_BREAKERS = sql(
    f"""
    WITH victims AS (
        SELECT b.id FROM runs.wake_breakers b
        WHERE b.tripped_at < :cutoff
          AND (b.announced_at IS NOT NULL OR b.issue_id IS NULL)
          AND (
              (b.kind = 'daily_run_budget'
               AND b.tripped_at < now() - make_interval(secs => :budget_window))
              OR EXISTS (
                  SELECT 1 FROM runs.wake_breakers n
                  WHERE n.agent_id = b.agent_id AND n.kind = b.kind
                    AND n.issue_id = b.issue_id AND n.reason = b.reason
                    AND n.tripped_at > b.tripped_at)
              OR EXISTS (
                  SELECT 1 FROM audit.activity_log a
                  WHERE a.company_id = b.company_id AND a.entity_type = 'issue'
                    AND a.entity_id = CAST(b.issue_id AS text)
                    AND a.created_at > b.tripped_at
                    AND a.created_at < now() - make_interval(secs => :loop_window)
                    AND {CLEARS_LOOP_TRIP}))
        ORDER BY b.tripped_at
        LIMIT :limit
        FOR UPDATE OF b SKIP LOCKED
    ),
    gone AS (
        DELETE FROM runs.wake_breakers b USING victims v WHERE b.id = v.id RETURNING 1
    )
    SELECT count(*) FROM gone
    """
)

RUNS = sql(
    f"""
    WITH victims AS (
        SELECT r.id FROM runs.heartbeat_runs r
        WHERE r.status IN {TERMINAL} AND r.finished_at < :cutoff
          AND NOT ({REFERENCED_BY_ISSUE.format(run="r.id")})
          AND NOT EXISTS (SELECT 1 FROM runs.heartbeat_runs c WHERE c.retry_of_run_id = r.id)
          AND NOT EXISTS (SELECT 1 FROM runs.wakeup_requests w WHERE w.run_id = r.id)
          AND NOT {ACTIVE_LEASE_OF_RUN}
          AND NOT (
              r.issue_id IS NOT NULL
              AND {RUN_ISSUE_OPEN}
              AND NOT EXISTS (
                  SELECT 1 FROM runs.heartbeat_runs n
                  WHERE n.issue_id = r.issue_id AND n.agent_id = r.agent_id
                    AND (n.created_at, n.id) > (r.created_at, r.id)))
        ORDER BY r.finished_at
        LIMIT :limit
        FOR UPDATE OF r SKIP LOCKED
    ),
    gone AS (
        DELETE FROM runs.heartbeat_runs r USING victims v WHERE r.id = v.id RETURNING 1
    )
    SELECT count(*) FROM gone
    """
)


async def run_events_step(tx: Tx, limit: int, cutoff: datetime, cursor: Cursor) -> Step:
    """Up to ``limit`` events of the next ``limit`` expired runs behind ``cursor``; the
    cursor moves past those runs once none of their events is left."""
    after_at, after_id = cursor or _START
    row = await tx.fetchrow(
        RUN_EVENTS, {"cutoff": cutoff, "after_at": after_at, "after_id": after_id, "limit": limit}
    )
    assert row is not None
    deleted = int(row["deleted"])
    if deleted >= limit:
        return Step(deleted, done=False, cursor=cursor)
    if int(row["runs"]) < limit:
        return Step(deleted, done=True)
    return Step(deleted, done=False, cursor=(row["last_at"], row["last_id"]))


def policies(settings: Settings) -> Sequence[Policy]:
    """The run service's policies, in sweep order (wakes before the runs they name)."""
    return [
        Policy("runs.run_events", days(settings.retention_run_events_days), run_events_step),
        Policy(
            "runs.wakeup_requests",
            days(settings.retention_skipped_wakes_days),
            counting(SKIPPED_WAKES),
            part="skipped",
        ),
        Policy(
            "runs.wakeup_requests",
            days(settings.retention_wakes_days),
            counting(FINISHED_WAKES),
            part="finished",
        ),
        Policy(
            "runs.wake_breakers",
            days(settings.retention_wake_breakers_days),
            counting(
                WAKE_BREAKERS,
                {
                    "budget_window": BUDGET_WINDOW_SECONDS,
                    "loop_window": WAKE_LOOP_WINDOW_MAX_SECONDS,
                },
            ),
        ),
        Policy(
            "runs.heartbeat_runs",
            days(settings.retention_runs_days),
            counting(RUNS, until_empty=True),
        ),
    ]


async def retention_forever(db: Database, settings: Settings) -> None:
    """The run service's periodic sweep (one replica at a time)."""
    await sweep_by_settings(db, settings, policies, lock_key=LOCK_KEY)
