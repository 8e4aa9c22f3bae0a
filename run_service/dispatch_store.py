"""SQL of the admission gate (``run_service.dispatch``): agents with queued runs, the
agent lock, the pick and the claim of queued runs, and their undoing.

The claim path runs these one after the other in one transaction per agent; each
statement does its whole step (pick and lock, claim, claim the wakes) in one round trip.
Every function takes the connection of the caller's unit of work; none commits.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.sql import Row, Tx, sql
from run_service import foreign_reads
from run_service.run_store import RUN_COLUMNS

_AGENTS_WITH_QUEUED = sql(
    """
    SELECT agent_id FROM runs.heartbeat_runs
    WHERE status = 'queued'
      AND (CAST(:companies AS uuid[]) IS NULL OR company_id = ANY(CAST(:companies AS uuid[])))
    GROUP BY agent_id ORDER BY min(created_at) LIMIT :limit
    """
)
_LOCK_AGENT = sql(
    """
    SELECT id, company_id, status, adapter_config, max_concurrent_runs, timeout_seconds,
           idle_timeout_seconds, grace_seconds
    FROM runs.agents WHERE id = :a FOR UPDATE
    """
)
_RUNNING_COUNT = sql(
    "SELECT count(*) FROM runs.heartbeat_runs WHERE agent_id = :a AND status = 'running'"
)
_PICK = sql(
    f"""
    SELECT r.id FROM runs.heartbeat_runs r
    {foreign_reads.RUN_ISSUE_JOIN}
    WHERE r.agent_id = :a AND r.status = 'queued'
      AND NOT EXISTS (
          SELECT 1 FROM runs.heartbeat_runs h
          WHERE h.id = i.execution_run_id AND h.id <> r.id
            AND h.status IN ('queued', 'running'))
    ORDER BY
      CASE WHEN r.issue_id IS NULL THEN 2
           WHEN i.status = 'in_progress' THEN 0
           WHEN i.status = 'blocked' THEN 3
           ELSE 1 END,
      CASE i.priority WHEN 'critical' THEN 0 WHEN 'high' THEN 1 WHEN 'medium' THEN 2
                      WHEN 'low' THEN 3 ELSE 2 END,
      r.created_at, r.id
    LIMIT :n
    FOR UPDATE OF r SKIP LOCKED
    """
)
_CLAIM = sql(
    f"""
    UPDATE runs.heartbeat_runs
    SET status = 'running', started_at = now(), supervisor_node_id = :node,
        last_activity_at = now(), updated_at = now()
    WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'queued'
    RETURNING {RUN_COLUMNS}
    """
)
_CLAIM_WAKES = sql(
    """
    UPDATE runs.wakeup_requests SET status = 'claimed'
    WHERE status = 'queued'
      AND (run_id = ANY(CAST(:ids AS uuid[])) OR id = ANY(CAST(:wakes AS uuid[])))
    """
)
_CANCEL_QUEUED = sql(
    """
    UPDATE runs.heartbeat_runs
    SET status = 'cancelled', error_code = 'agent_not_found', error = 'agent terminated',
        finished_at = now(), updated_at = now()
    WHERE agent_id = :a AND status = 'queued'
    RETURNING id, wakeup_request_id, issue_id
    """
)
_CANCEL_WAKES = sql(
    """
    UPDATE runs.wakeup_requests SET status = 'cancelled', finished_at = now()
    WHERE status IN ('queued', 'claimed')
      AND (run_id = ANY(CAST(:ids AS uuid[])) OR id = ANY(CAST(:wakes AS uuid[])))
    """
)
_REQUEUE = sql(
    """
    UPDATE runs.heartbeat_runs
    SET status = 'queued', started_at = NULL, supervisor_node_id = NULL,
        last_activity_at = NULL, updated_at = now()
    WHERE id = :id AND status = 'running' AND process_pid IS NULL
    RETURNING wakeup_request_id
    """
)
_REQUEUE_WAKE = sql(
    """
    UPDATE runs.wakeup_requests SET status = 'queued'
    WHERE status = 'claimed' AND (run_id = :id OR id = :wake)
    """
)


async def agents_with_queued(tx: Tx, *, limit: int, company_ids: Sequence[str] | None) -> list[str]:
    """Up to ``limit`` agents with queued runs, oldest queued run first (``company_ids``:
    only of those companies; None: all)."""
    rows = await tx.fetch(
        _AGENTS_WITH_QUEUED,
        {"limit": limit, "companies": None if company_ids is None else list(company_ids)},
    )
    return [str(r["agent_id"]) for r in rows]


async def lock_agent(tx: Tx, agent_id: str) -> Row | None:
    """The agent's admission fields, its row locked FOR UPDATE; None if it is gone."""
    return await tx.fetchrow(_LOCK_AGENT, {"a": agent_id})


async def running_count(tx: Tx, agent_id: str) -> int:
    """How many runs of the agent are running (on any node)."""
    return int(await tx.fetchval(_RUNNING_COUNT, {"a": agent_id}))


async def pick(tx: Tx, agent_id: str, n: int) -> list[str]:
    """Up to ``n`` of the agent's startable queued runs in dispatch order (see
    ``run_service.dispatch``), locked FOR UPDATE SKIP LOCKED."""
    return [str(r["id"]) for r in await tx.fetch(_PICK, {"a": agent_id, "n": n})]


async def claim(tx: Tx, run_ids: Sequence[str], node_id: str) -> list[Row]:
    """Mark those of the runs still queued running on ``node_id``; their rows."""
    return await tx.fetch(_CLAIM, {"ids": list(run_ids), "node": node_id})


async def claim_wakes(tx: Tx, run_ids: Sequence[str], wake_ids: Sequence[str]) -> None:
    """Mark the queued wakes of the claimed runs ``claimed``."""
    await tx.execute(_CLAIM_WAKES, {"ids": list(run_ids), "wakes": list(wake_ids)})


async def cancel_queued(tx: Tx, agent_id: str) -> list[Row]:
    """Cancel every queued run of a terminated agent; (id, wakeup_request_id, issue_id)
    of each."""
    return await tx.fetch(_CANCEL_QUEUED, {"a": agent_id})


async def cancel_wakes(tx: Tx, run_ids: Sequence[str], wake_ids: Sequence[str]) -> None:
    """Cancel the queued or claimed wakes of the cancelled runs."""
    await tx.execute(_CANCEL_WAKES, {"ids": list(run_ids), "wakes": list(wake_ids)})


async def requeue(tx: Tx, run_id: str) -> Row | None:
    """Put a claimed, never spawned run back in the queue; its (wakeup_request_id), or
    None when it is not such a run any more."""
    return await tx.fetchrow(_REQUEUE, {"id": run_id})


async def requeue_wake(tx: Tx, run_id: str, wake_id: object) -> None:
    """Put the claimed wake of a requeued run back to ``queued``."""
    await tx.execute(_REQUEUE_WAKE, {"id": run_id, "wake": wake_id})
