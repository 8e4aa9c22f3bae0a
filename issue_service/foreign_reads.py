"""The issue service's reads of other services' tables, and the fragments of its own
statements that join or sub-select them.

Of the run service's schema (``runs``):

- ``runs.heartbeat_runs``: the status of a run holding an issue's checkout or execution
  lock (a lock held by a terminal or missing run is stale), read alone (``run_status``)
  or with the locked issue row (``EXECUTION_RUN_STATUS``); the live runs whose locks
  the stale-lock sweep leaves (``LIVE_LOCK_HOLDER``); whether the run an audit row is
  about still exists (``run_exists``, for retention).
- ``runs.agents``: an agent's company, status and name key, for assignment and
  checkout, read alone (``agent_info``) or joined to the issue row a checkout locks
  (``CHECKOUT_AGENT_COLUMNS``, ``CHECKOUT_AGENT_JOIN``); the agents a comment mentions
  (``mentioned_agents``).
- ``runs.consumer_cursors``: how far the readers of the outbox have read, below which
  outbox retention may delete events (``OUTBOX_HORIZON``).

Of the workspace service's schema (``workspaces``):

- ``workspaces.environment_leases`` and ``workspaces.execution_workspaces``: whether
  the lease or workspace an audit row is about still exists (``lease_exists``,
  ``workspace_exists``, for retention).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from common.sql import Tx, sql

#: The status of the run holding the execution lock, read (not locked) with the issue
#: (a column of a statement on ``issues.issues``).
EXECUTION_RUN_STATUS = """
    (SELECT r.status FROM runs.heartbeat_runs r WHERE r.id = issues.execution_run_id)
        AS execution_run_status
"""
#: The columns of the agent a checkout is for (``agent_*``, NULL when there is no such
#: agent), from ``CHECKOUT_AGENT_JOIN``.
CHECKOUT_AGENT_COLUMNS = """agent.company_id AS agent_company_id, agent.status AS agent_status,
        agent.name_key AS agent_name_key,"""
#: The agent ``:agent``, joined to the issue row a checkout locks.
CHECKOUT_AGENT_JOIN = "LEFT JOIN runs.agents agent ON agent.id = :agent"
#: The condition of a sub-select: a live run holds the execution or checkout lock of
#: the issue row ``i``.
LIVE_LOCK_HOLDER = """SELECT 1 FROM runs.heartbeat_runs r
              WHERE r.id IN (i.execution_run_id, i.checkout_run_id)
                AND r.status IN ('queued', 'running')"""
#: The highest outbox event id every consumer in ``:consumers`` has read (0 while one
#: of them has no cursor yet), as the one row ``id``.
OUTBOX_HORIZON = """SELECT CASE WHEN count(*) = cardinality(:consumers::text[])
                    THEN min(last_event_id) ELSE 0 END AS id
        FROM runs.consumer_cursors WHERE consumer = ANY(:consumers::text[])"""


def run_exists(id_expr: str) -> str:
    """The sub-select of the run whose id is the SQL expression ``id_expr``."""
    return f"SELECT 1 FROM runs.heartbeat_runs r WHERE r.id = {id_expr}"


def lease_exists(id_expr: str) -> str:
    """The sub-select of the environment lease whose id is ``id_expr``."""
    return f"SELECT 1 FROM workspaces.environment_leases l WHERE l.id = {id_expr}"


def workspace_exists(id_expr: str) -> str:
    """The sub-select of the execution workspace whose id is ``id_expr``."""
    return f"SELECT 1 FROM workspaces.execution_workspaces w WHERE w.id = {id_expr}"


_RUN_STATUS = sql("SELECT status FROM runs.heartbeat_runs WHERE id = :id")
_RUN_STATUS_SHARE = sql("SELECT status FROM runs.heartbeat_runs WHERE id = :id FOR SHARE")
_AGENT = sql("SELECT id, company_id, status, name_key FROM runs.agents WHERE id = :id")
_MENTIONED_AGENTS = sql(
    """
            SELECT id FROM runs.agents
            WHERE company_id = :company AND status <> 'terminated'
              AND (name_key = ANY(CAST(:names AS text[])) OR id = ANY(CAST(:ids AS uuid[])))
            ORDER BY name_key LIMIT :limit
            """
)


@dataclass(frozen=True)
class AgentInfo:
    """What the issue service needs to know of an agent."""

    id: str
    company_id: str
    status: str
    name_key: str


async def run_status(tx: Tx, run_id: str, *, lock: bool = False) -> str | None:
    """A run's status (None when the row is missing); ``lock`` takes a share lock."""
    value = await tx.fetchval(_RUN_STATUS_SHARE if lock else _RUN_STATUS, {"id": run_id})
    return None if value is None else str(value)


async def agent_info(tx: Tx, agent_id: str) -> AgentInfo | None:
    """The agent's company, status and name key (None when it does not exist)."""
    row = await tx.fetchrow(_AGENT, {"id": agent_id})
    if row is None:
        return None
    return AgentInfo(str(row["id"]), str(row["company_id"]), row["status"], row["name_key"])


async def mentioned_agents(
    tx: Tx, company_id: str, *, names: Collection[str], ids: Collection[str], limit: int
) -> list[str]:
    """Ids of the company's agents, not terminated, with one of ``names`` as name key or
    one of ``ids`` as id; at most ``limit``, by name key."""
    rows = await tx.fetch(
        _MENTIONED_AGENTS,
        {"company": company_id, "names": sorted(names), "ids": sorted(ids), "limit": limit},
    )
    return [str(r[0]) for r in rows]
