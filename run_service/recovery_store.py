"""Recovery of runs whose supervisor is gone: the sweep lock, the orphaned runs and their
claim, adoption (``process_detached``) and the limits of adopted runs, the terminal write
of a lost run (``process_lost``) and its one automatic retry."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from common.sql import Row, Tx, sql
from run_service import run_store

#: How long ReapOrphanedRuns waits for a pass of another replica to finish.
RPC_LOCK_WAIT_SECONDS = 10.0

_TRY_SWEEP_LOCK = sql("SELECT pg_try_advisory_xact_lock(hashtext(:key))")
_SWEEP_LOCK = sql("SELECT pg_advisory_xact_lock(hashtext(:key))")
_LOCK_TIMEOUT = sql(f"SET LOCAL lock_timeout = '{int(RPC_LOCK_WAIT_SECONDS * 1000)}ms'")
#: The ``running`` runs of the given nodes (and, with ``:nodeless``, of no node), oldest
#: start first (public: the bench explains its plan).
ORPHAN_RUNS = sql(
    """
    SELECT id, supervisor_node_id FROM runs.heartbeat_runs
    WHERE status = 'running'
      AND (supervisor_node_id = ANY(CAST(:nodes AS uuid[]))
           OR (CAST(:nodeless AS boolean) AND supervisor_node_id IS NULL))
      AND (CAST(:companies AS uuid[]) IS NULL OR company_id = ANY(CAST(:companies AS uuid[])))
    ORDER BY started_at NULLS FIRST LIMIT :limit
    """
)
_CLAIM = sql(
    f"""
    UPDATE runs.heartbeat_runs SET supervisor_node_id = :me, updated_at = now()
    WHERE id = :id AND status = 'running'
      AND supervisor_node_id IS NOT DISTINCT FROM CAST(:old AS uuid)
    RETURNING {run_store.RUN_COLUMNS}
    """
)
_MARK_DETACHED = sql(
    """
    UPDATE runs.heartbeat_runs
    SET error_code = 'process_detached', error = :error, updated_at = now()
    WHERE id = :id AND status = 'running' AND supervisor_node_id = :me
    RETURNING now() AS adopted_at
    """
)
#: What the poller needs to enforce the limits of adopted runs (database clock).
_ADOPTED_LIMITS = sql(
    """
    SELECT id, now() AS now, started_at, timeout_seconds, idle_timeout_seconds,
           last_activity_at, last_output_at
    FROM runs.heartbeat_runs
    WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'running'
    """
)
_LOST = sql(
    """
    UPDATE runs.heartbeat_runs
    SET status = 'failed', error_code = 'process_lost', error = :error,
        finished_at = now(), updated_at = now()
    WHERE id = :id AND status = 'running' AND supervisor_node_id = :me
    RETURNING id
    """
)
_INSERT_RETRY = sql(
    """
    INSERT INTO runs.heartbeat_runs
        (company_id, agent_id, issue_id, status, invocation_source, wake_reason,
         trigger_detail, wakeup_request_id, retry_of_run_id, retry_reason,
         process_loss_retry_count, context)
    VALUES (:company, :agent, :issue, 'queued', :source, :reason, :detail, :wake, :old,
            :retry_reason, :count, CAST(:context AS jsonb))
    RETURNING id
    """
)
_INSERT_RETRY_WAKE = sql(
    """
    INSERT INTO runs.wakeup_requests
        (id, company_id, agent_id, source, reason, issue_id, payload, status, run_id,
         requested_by_actor_type, requested_by_actor_id)
    VALUES (:id, :company, :agent, :source, :reason, :issue, CAST(:payload AS jsonb),
            'queued', :run, 'system', 'run_service')
    """
)


# -- the sweep lock ---------------------------------------------------------------------


async def try_sweep_lock(tx: Tx, key: str) -> bool:
    """Take the sweep's transaction-level advisory lock if it is free."""
    return bool(await tx.fetchval(_TRY_SWEEP_LOCK, {"key": key}))


async def wait_sweep_lock(tx: Tx, key: str) -> None:
    """Take the sweep's transaction-level advisory lock, waiting at most
    ``RPC_LOCK_WAIT_SECONDS`` for it (the lock timeout of the transaction)."""
    await tx.execute(_LOCK_TIMEOUT)
    await tx.fetchval(_SWEEP_LOCK, {"key": key})


# -- orphaned runs and their claim ------------------------------------------------------


async def orphan_runs(
    tx: Tx,
    *,
    nodes: Sequence[str],
    nodeless: bool,
    companies: Sequence[str] | None,
    limit: int,
) -> list[Row]:
    """The rows (id, supervisor_node_id) of :data:`ORPHAN_RUNS`."""
    return await tx.fetch(
        ORPHAN_RUNS,
        {"nodes": list(nodes), "nodeless": nodeless, "companies": companies, "limit": limit},
    )


async def claim_run(tx: Tx, run_id: str, *, me: str, old: str | None) -> Row | None:
    """Move a ``running`` run from node ``old`` (None: no node) to ``me``; the run row,
    or None when it ended meanwhile or another node claimed it first."""
    return await tx.fetchrow(_CLAIM, {"id": run_id, "me": me, "old": old})


# -- adopted runs -----------------------------------------------------------------------


async def mark_detached(tx: Tx, run_id: str, *, me: str, error: str) -> datetime:
    """Mark a run of ``me`` ``process_detached`` with ``error``; when (database clock)."""
    adopted_at: datetime = await tx.fetchval(
        _MARK_DETACHED, {"id": run_id, "me": me, "error": error}
    )
    return adopted_at


async def adopted_limits(tx: Tx, run_ids: Sequence[str]) -> list[Row]:
    """The limits snapshot of those runs still ``running``, with the database's ``now``:
    id, now, started_at, timeout_seconds, idle_timeout_seconds, last_activity_at,
    last_output_at."""
    return await tx.fetch(_ADOPTED_LIMITS, {"ids": list(run_ids)})


# -- lost runs --------------------------------------------------------------------------


async def mark_lost(tx: Tx, run_id: str, *, me: str, error: str) -> bool:
    """End a ``running`` run of ``me`` ``failed`` / ``process_lost``; False when it is no
    longer running on ``me``."""
    return await tx.fetchval(_LOST, {"id": run_id, "me": me, "error": error}) is not None


async def insert_retry_run(tx: Tx, params: dict[str, Any]) -> str:
    """Insert the queued retry run; its id. ``params``: company, agent, issue, source,
    reason, detail, wake, old, retry_reason, count, context (JSON text). Raises the
    ``UniqueViolationError`` of the one-active-run index when it refuses the run."""
    return str(await tx.fetchval(_INSERT_RETRY, params))


async def insert_retry_wake(tx: Tx, params: dict[str, Any]) -> None:
    """Insert the queued wakeup row of a retry run. ``params``: id, company, agent,
    source, reason, issue, payload (JSON text), run."""
    await tx.execute(_INSERT_RETRY_WAKE, params)
