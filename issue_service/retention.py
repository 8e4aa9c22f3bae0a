"""Retention of the outbox and the audit log (README "Retention"; ``common.retention``).

``issues.issue_events`` (default 1 day): an event is deleted once every consumer of
the outbox has passed it (its id is at or below the lowest ``runs.consumer_cursors``
row of ``CONSUMERS``; while any of them has no cursor row yet, nothing is) and it is
older than the horizon. An unread event is never deleted.

``audit.activity_log`` (default 90 days): rows older than the horizon about an entity
that no longer exists: an issue, a run, an environment lease or an execution workspace
(runs and leases are deleted by their own retention). The rows of an issue that still
exists are kept for as long as the issue does, and so are rows naming it as
``details.issueId`` (a run cancelled on it, a lease taken for it); rows about other
kinds of entity (companies, agents, API keys) are kept. Nothing is archived. The log is
walked in id order behind a cursor, a bounded slice of ids per batch, so the kept rows
are read once per sweep; the walk stops at the first row younger than the horizon.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from common.config import Settings
from common.db import Database
from common.retention import Cursor, Policy, Step, counting, days, sweep_by_settings
from common.sql import Tx, sql
from issue_service.foreign_reads import (
    OUTBOX_HORIZON,
    lease_exists,
    run_exists,
    workspace_exists,
)

LOCK_KEY = "issue_service.retention"
#: The readers of ``issues.issue_events`` (``run_service.outbox.CONSUMER`` and
#: ``run_service.run_interrupts.CONSUMER``).
CONSUMERS = ("run_service.wakes", "run_service.interrupts")

ISSUE_EVENTS = sql(
    f"""
    WITH horizon AS (
        {OUTBOX_HORIZON}
    ),
    gone AS (
        DELETE FROM issues.issue_events
        WHERE id IN (
            SELECT e.id FROM issues.issue_events e
            WHERE e.id <= (SELECT id FROM horizon) AND e.created_at < :cutoff
            ORDER BY e.id
            LIMIT :limit)
        RETURNING 1
    )
    SELECT count(*) FROM gone
    """
)

_UUID = "'^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'"


def _as_uuid(expr: str) -> str:
    return f"(CASE WHEN {expr} ~ {_UUID} THEN ({expr})::uuid END)"


_ENTITY = _as_uuid("s.entity_id")
_ISSUE_IN_DETAILS = _as_uuid("s.details ->> 'issueId'")

ACTIVITY = sql(
    f"""
    WITH scanned AS (
        SELECT id, entity_type, entity_id, details, created_at FROM audit.activity_log
        WHERE id > :after
        ORDER BY id
        LIMIT :limit
    ),
    victims AS (
        SELECT s.id FROM scanned s
        WHERE s.created_at < :cutoff
          AND s.entity_type IN ('issue', 'run', 'environment_lease', 'execution_workspace')
          AND NOT EXISTS (SELECT 1 FROM issues.issues i WHERE i.id = {_ISSUE_IN_DETAILS})
          AND NOT CASE s.entity_type
              WHEN 'issue' THEN EXISTS (SELECT 1 FROM issues.issues i WHERE i.id = {_ENTITY})
              WHEN 'run' THEN EXISTS ({run_exists(_ENTITY)})
              WHEN 'environment_lease' THEN EXISTS (
                  {lease_exists(_ENTITY)})
              ELSE EXISTS (
                  {workspace_exists(_ENTITY)})
          END
    ),
    gone AS (
        DELETE FROM audit.activity_log a USING victims v WHERE a.id = v.id RETURNING 1
    ),
    last AS (SELECT id, created_at FROM scanned ORDER BY id DESC LIMIT 1)
    SELECT (SELECT count(*) FROM gone) AS deleted,
           (SELECT count(*) FROM scanned) AS scanned,
           (SELECT id FROM last) AS last_id,
           (SELECT created_at < :cutoff FROM last) AS last_expired
    """
)


async def activity_step(tx: Tx, limit: int, cutoff: datetime, cursor: Cursor) -> Step:
    """The next ``limit`` rows of the log behind ``cursor``: those expired and about
    an entity that is gone are deleted."""
    after = cursor[0] if cursor else 0
    row = await tx.fetchrow(ACTIVITY, {"after": after, "limit": limit, "cutoff": cutoff})
    assert row is not None
    deleted = int(row["deleted"])
    if int(row["scanned"]) < limit or not row["last_expired"]:
        return Step(deleted, done=True)
    return Step(deleted, done=False, cursor=(int(row["last_id"]),))


def policies(settings: Settings, consumers: Sequence[str] = CONSUMERS) -> Sequence[Policy]:
    """The issue service's policies, in sweep order."""
    return [
        Policy(
            "issues.issue_events",
            days(settings.retention_issue_events_days),
            counting(ISSUE_EVENTS, {"consumers": list(consumers)}),
        ),
        Policy("audit.activity_log", days(settings.retention_activity_days), activity_step),
    ]


async def retention_forever(db: Database, settings: Settings) -> None:
    """The issue service's periodic sweep (one replica at a time)."""
    await sweep_by_settings(db, settings, policies, lock_key=LOCK_KEY)
