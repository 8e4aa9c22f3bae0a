"""The run service's reads of other services' schemas, and the foreign fragments its own
statements compose (for one round trip).

``issues.*`` (the issue service):

- ``issues.companies``: whether a company exists (agent registration, ``ListRuns``).
- ``issues.issues``: whether a wake's issue is in the agent's company; an issue's status
  (reopening for a promoted comment wake); the dispatch order of queued runs (issue
  status, priority, execution lock holder); the stranded-issue candidates (issues
  assigned to agents); retention keeps runs an issue still names or decides on.
- ``issues.issue_comments``: whether a run commented on its issue (comment policy); the
  authors of a wake's comments (reopening).
- ``issues.issue_events``: the outbox the wake consumer and the run-interrupt consumer
  read.

``workspaces.*`` (the workspace service):

- ``workspaces.environment_leases``: retention keeps a run an active lease names.

Every function takes the connection of the caller's unit of work; none writes.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.sql import Row, Tx, sql

# --- fragments composed into run-service statements ----------------------------------

#: ``issues.issues`` as ``i``, the issue of the run ``r`` (none for an issue-less run);
#: dispatch orders on ``i.status`` and ``i.priority`` and skips runs whose issue's
#: ``i.execution_run_id`` is another live run.
RUN_ISSUE_JOIN = "LEFT JOIN issues.issues i ON i.id = r.issue_id"

#: ``issues.issues`` as ``i``, the ``todo`` and ``in_progress`` issues assigned to the
#: agent ``a`` (the stranded-issue candidates).
ASSIGNED_OPEN_ISSUES_JOIN = (
    "JOIN issues.issues i\n"
    "          ON i.assignee_agent_id = a.id AND i.status IN ('todo', 'in_progress')"
)

#: A condition: an issue names the run ``{run}`` (a column reference, filled in with
#: ``str.format``) as its ``checkout_run_id`` or ``execution_run_id``.
REFERENCED_BY_ISSUE = """
    EXISTS (SELECT 1 FROM issues.issues i WHERE i.checkout_run_id = {run})
    OR EXISTS (SELECT 1 FROM issues.issues i WHERE i.execution_run_id = {run})
"""

#: A condition: an active environment lease names the run ``r``.
ACTIVE_LEASE_OF_RUN = """EXISTS (
              SELECT 1 FROM workspaces.environment_leases l
              WHERE l.run_id = r.id AND l.status = 'active')"""

#: A condition: the issue of the run ``r`` is open (neither done nor cancelled).
RUN_ISSUE_OPEN = """EXISTS (
                  SELECT 1 FROM issues.issues i
                  WHERE i.id = r.issue_id AND i.status NOT IN ('done', 'cancelled'))"""

# --- named reads ---------------------------------------------------------------------

_COMPANY_EXISTS = sql("SELECT 1 FROM issues.companies WHERE id = :id")
_ISSUE_IN_COMPANY = sql("SELECT 1 FROM issues.issues WHERE id = :issue AND company_id = :company")
_ISSUE_STATUS = sql("SELECT status FROM issues.issues WHERE id = :issue")
_RUN_COMMENT = sql(
    """
    SELECT id FROM issues.issue_comments
    WHERE issue_id = :issue AND created_by_run_id = :run
    ORDER BY created_at, id LIMIT 1
    """
)
_COMMENT_AUTHORS = sql(
    """
    SELECT author_type, created_by_run_id FROM issues.issue_comments
    WHERE issue_id = :issue AND id = ANY(CAST(:ids AS uuid[]))
    """
)

#: The columns of an outbox event the wake consumer reads.
_EVENT_COLUMNS = """
    e.id, e.company_id, e.issue_id, e.type, e.actor_type, e.actor_id, e.actor_agent_id,
    e.actor_run_id, e.target_agent_id, e.payload
"""
_NEW_EVENTS = sql(
    f"SELECT {_EVENT_COLUMNS} FROM issues.issue_events e WHERE e.id > :after ORDER BY e.id"
    " LIMIT :limit"
)
_MISSED_EVENTS = sql(
    f"""
    SELECT {_EVENT_COLUMNS} FROM issues.issue_events e
    WHERE e.id > :low AND e.id <= :high
      AND e.type = ANY(CAST(:types AS text[]))
      AND e.target_agent_id IS NOT NULL
      AND e.actor_agent_id IS DISTINCT FROM e.target_agent_id
      AND EXISTS (SELECT 1 FROM runs.agents a WHERE a.id = e.target_agent_id)
      AND NOT EXISTS (
          SELECT 1 FROM runs.wakeup_requests w
          WHERE w.agent_id = e.target_agent_id AND w.idempotency_key = 'event:' || e.id
      )
    ORDER BY e.id LIMIT :limit
    """
)
_LATEST_EVENT_ID = sql("SELECT COALESCE(max(id), 0) FROM issues.issue_events")
_EVENTS_OF_TYPES = sql(
    """
    SELECT id, type, issue_id, payload FROM issues.issue_events
    WHERE id > :low AND id <= :high AND type = ANY(CAST(:types AS text[]))
    ORDER BY id LIMIT :limit
    """
)


async def company_exists(tx: Tx, company_id: str) -> bool:
    """Whether the company exists."""
    return await tx.fetchval(_COMPANY_EXISTS, {"id": company_id}) is not None


async def issue_in_company(tx: Tx, issue_id: str, company_id: object) -> bool:
    """Whether the issue exists in the company."""
    found = await tx.fetchval(_ISSUE_IN_COMPANY, {"issue": issue_id, "company": company_id})
    return found is not None


async def issue_status(tx: Tx, issue_id: str) -> str | None:
    """The issue's status, None when there is no such issue."""
    status: str | None = await tx.fetchval(_ISSUE_STATUS, {"issue": issue_id})
    return status


async def run_comment_id(tx: Tx, issue_id: str, run_id: str) -> object | None:
    """The id of the first comment the run wrote on the issue, or None."""
    comment: object | None = await tx.fetchval(_RUN_COMMENT, {"issue": issue_id, "run": run_id})
    return comment


async def comment_authors(tx: Tx, issue_id: str, comment_ids: Sequence[str]) -> list[Row]:
    """(author_type, created_by_run_id) of those comments of the issue that exist."""
    return await tx.fetch(_COMMENT_AUTHORS, {"issue": issue_id, "ids": list(comment_ids)})


async def issue_events_after(tx: Tx, after: int, limit: int) -> list[Row]:
    """Up to ``limit`` outbox events with an id above ``after``, in id order."""
    return await tx.fetch(_NEW_EVENTS, {"after": after, "limit": limit})


async def unwoken_issue_events(
    tx: Tx, *, low: int, high: int, types: Sequence[str], limit: int
) -> list[Row]:
    """Up to ``limit`` outbox events with ``low < id <= high`` of ``types`` that should
    wake a registered agent other than their actor but have no ``event:<id>`` wake."""
    return await tx.fetch(
        _MISSED_EVENTS, {"low": low, "high": high, "types": list(types), "limit": limit}
    )


async def latest_issue_event_id(tx: Tx) -> int:
    """The highest outbox event id (0 when there is none)."""
    return int(await tx.fetchval(_LATEST_EVENT_ID, {}))


async def issue_events_of_types(
    tx: Tx, *, low: int, high: int, types: Sequence[str], limit: int
) -> list[Row]:
    """(id, type, issue_id, payload) of up to ``limit`` outbox events with
    ``low < id <= high`` of ``types``, in id order."""
    return await tx.fetch(
        _EVENTS_OF_TYPES, {"low": low, "high": high, "types": list(types), "limit": limit}
    )
