"""The workspace service's reads of the issue and run services' tables, in the unit of
work of the caller. It never writes them.

- ``issues.companies``: whether the company a workspace is made or listed for exists.
- ``issues.issues``: the issue a workspace is for (access checks, creation, close
  readiness); in the runtime store's statements, the status of a workspace's source
  issue (the services of a closed issue's isolated workspace are stopped and not
  restarted), composed from the join fragments below.
- ``runs.heartbeat_runs``: the run a lease is taken for, renewed or released with
  (share-locked while a lease is taken); in the lease sweep's statement, the run of each
  active lease, composed from ``LEASE_RUN_LEFT_JOIN``.
- ``runs.supervisor_nodes``: the host whose supervisor node runs a run, where a
  workspace for that run's agent is made.
"""

from __future__ import annotations

from common.sql import Row, Tx, sql

#: Joins ``i``, the source issue of the workspace ``w`` (NULL columns when it has none).
SOURCE_ISSUE_LEFT_JOIN = "LEFT JOIN issues.issues i ON i.id = w.source_issue_id"
#: Joins ``i``, the source issue of the workspace ``w`` (rows of workspaces with one).
SOURCE_ISSUE_JOIN = "JOIN issues.issues i ON i.id = w.source_issue_id"
#: Joins ``r``, the run of the lease ``l`` (NULL columns when its row is gone).
LEASE_RUN_LEFT_JOIN = "LEFT JOIN runs.heartbeat_runs r ON r.id = l.run_id"

_COMPANY_EXISTS = sql("SELECT EXISTS (SELECT 1 FROM issues.companies WHERE id = :id)")
_ISSUE = sql(
    """
    SELECT id, company_id, identifier, title, status, assignee_agent_id
      FROM issues.issues WHERE id = :id
    """
)
# FOR SHARE holds off the run's terminal write until this transaction ends: a lease is
# never taken for a run that ends meanwhile without its ReleaseRunLeases seeing it.
_LIVE_RUN = sql(
    """
    SELECT id, company_id, agent_id, issue_id, status, error, error_code
      FROM runs.heartbeat_runs WHERE id = :id FOR SHARE
    """
)
_RUN = sql(
    """
    SELECT id, company_id, agent_id, issue_id, status, error, error_code
      FROM runs.heartbeat_runs WHERE id = :id
    """
)
_RUN_HOST = sql(
    """
    SELECT n.host FROM runs.heartbeat_runs r
    JOIN runs.supervisor_nodes n ON n.id = r.supervisor_node_id
    WHERE r.id = :run
    """
)


async def company_exists(tx: Tx, company_id: str) -> bool:
    return bool(await tx.fetchval(_COMPANY_EXISTS, {"id": company_id}))


async def get_issue(tx: Tx, issue_id: str) -> Row | None:
    """The issue (id, company_id, identifier, title, status, assignee_agent_id)."""
    return await tx.fetchrow(_ISSUE, {"id": issue_id})


async def get_run(tx: Tx, run_id: str, *, hold: bool = False) -> Row | None:
    """The run (id, company_id, agent_id, issue_id, status, error, error_code), or None;
    ``hold`` share-locks it so that it cannot end before this transaction does."""
    return await tx.fetchrow(_LIVE_RUN if hold else _RUN, {"id": run_id})


async def run_host(tx: Tx, run_id: str) -> str | None:
    """The host whose supervisor node runs ``run_id`` (None: not started anywhere)."""
    host = await tx.fetchval(_RUN_HOST, {"run": run_id})
    return str(host) if host is not None else None
