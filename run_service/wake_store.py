"""SQL of the wake flow (``run_service.wakes``): wakeup requests, the runs wakes queue or
merge into, deferred wakes, and the advisory locks that serialize wakes.

Every function takes the connection of the caller's unit of work; none commits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.sql import Row, Tx, sql
from run_service.run_store import RUN_COLUMNS, WAKEUP_COLUMNS

_LOCK = sql("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))")
_AGENT = sql(
    """
    SELECT id, company_id, status, heartbeat_interval_seconds, wake_on_demand
    FROM runs.agents WHERE id = :id
    """
)
_WAKE_BY_KEY = sql(
    f"""
    SELECT {WAKEUP_COLUMNS} FROM runs.wakeup_requests
    WHERE agent_id = :agent AND idempotency_key = :key
    """
)
_INSERT_WAKE = sql(
    f"""
    INSERT INTO runs.wakeup_requests
        (id, company_id, agent_id, source, reason, issue_id, payload, status, skip_reason,
         run_id, idempotency_key, source_event_id, requested_by_actor_type,
         requested_by_actor_id, requested_by_run_id, finished_at)
    VALUES (:id, :company, :agent, :source, :reason, :issue, CAST(:payload AS jsonb), :status,
            :skip_reason, :run, :key, :event, :actor_type, :actor_id, :actor_run,
            CASE WHEN :status IN ('skipped', 'coalesced') THEN now() END)
    ON CONFLICT (agent_id, idempotency_key) DO NOTHING
    RETURNING {WAKEUP_COLUMNS}
    """
)
_ACTIVE_ISSUE_RUN = sql(
    f"""
    SELECT {RUN_COLUMNS} FROM runs.heartbeat_runs
    WHERE issue_id = :issue AND status IN ('queued', 'running')
    ORDER BY agent_id = :agent DESC, status = 'running' DESC, created_at
    LIMIT 1
    """
)
_ISSUELESS_RUN = sql(
    f"""
    SELECT {RUN_COLUMNS} FROM runs.heartbeat_runs
    WHERE agent_id = :agent AND issue_id IS NULL AND status = :status
    ORDER BY created_at DESC LIMIT 1
    """
)
_LOCK_RUN_CONTEXT = sql("SELECT status, context FROM runs.heartbeat_runs WHERE id = :id FOR UPDATE")
_SET_RUN_CONTEXT = sql(
    """
    UPDATE runs.heartbeat_runs SET context = CAST(:context AS jsonb), updated_at = now()
    WHERE id = :id
    """
)
_INSERT_RUN = sql(
    f"""
    INSERT INTO runs.heartbeat_runs
        (company_id, agent_id, issue_id, status, invocation_source, wake_reason,
         wakeup_request_id, context)
    VALUES (:company, :agent, :issue, 'queued', :source, :reason, :wake,
            CAST(:context AS jsonb))
    RETURNING {RUN_COLUMNS}
    """
)
_DEFERRED_FOR = sql(
    f"""
    SELECT {WAKEUP_COLUMNS} FROM runs.wakeup_requests
    WHERE agent_id = :agent AND issue_id = :issue AND status = 'deferred'
    FOR UPDATE
    """
)
_MERGE_DEFERRED = sql(
    """
    UPDATE runs.wakeup_requests
    SET payload = CAST(:payload AS jsonb), reason = :reason,
        coalesced_count = coalesced_count + 1
    WHERE id = :id
    """
)
_ANY_ACTIVE_ISSUE_RUN = sql(
    "SELECT 1 FROM runs.heartbeat_runs WHERE issue_id = :issue AND status IN ('queued', 'running')"
)
_OLDEST_DEFERRED = sql(
    f"""
    SELECT {WAKEUP_COLUMNS} FROM runs.wakeup_requests
    WHERE issue_id = :issue AND status = 'deferred'
    ORDER BY requested_at, id
    LIMIT 1 FOR UPDATE SKIP LOCKED
    """
)
_NEXT_DEFERRED = sql(
    f"""
    SELECT {WAKEUP_COLUMNS} FROM runs.wakeup_requests w
    WHERE w.issue_id = :issue AND w.status = 'deferred'
      AND NOT EXISTS (SELECT 1 FROM runs.heartbeat_runs r
                      WHERE r.issue_id = :issue AND r.status IN ('queued', 'running'))
    ORDER BY w.requested_at, w.id
    LIMIT 1
    """
)
_FAIL_DEFERRED = sql(
    """
    UPDATE runs.wakeup_requests SET status = 'failed', skip_reason = :why, finished_at = now()
    WHERE id = :id
    """
)
_SKIP_DEFERRED = sql(
    """
    UPDATE runs.wakeup_requests
    SET status = 'skipped', skip_reason = :why, finished_at = now()
    WHERE id = :id
    """
)
_PROMOTE_DEFERRED = sql(
    "UPDATE runs.wakeup_requests SET status = 'queued', run_id = :run WHERE id = :id"
)


async def lock(tx: Tx, key: str) -> None:
    """Take the transaction-level advisory lock ``key`` (``wake-issue:<id>``,
    ``wake-agent:<id>``), waiting for it."""
    await tx.fetchval(_LOCK, {"key": key})


async def agent_for_wake(tx: Tx, agent_id: object) -> Row | None:
    """(id, company_id, status, heartbeat_interval_seconds, wake_on_demand) of the agent,
    or None."""
    return await tx.fetchrow(_AGENT, {"id": agent_id})


async def wake_by_key(tx: Tx, agent_id: str, idempotency_key: str) -> Row | None:
    """The agent's wake with that idempotency key, or None."""
    return await tx.fetchrow(_WAKE_BY_KEY, {"agent": agent_id, "key": idempotency_key})


async def insert_wake(tx: Tx, params: Mapping[str, Any]) -> Row | None:
    """Insert a wakeup request (every column of the statement in ``params``); None when
    the agent already has a wake with its idempotency key."""
    return await tx.fetchrow(_INSERT_WAKE, params)


async def active_issue_run(tx: Tx, issue_id: str, agent_id: str) -> Row | None:
    """The issue's queued or running run, the agent's first, running before queued."""
    return await tx.fetchrow(_ACTIVE_ISSUE_RUN, {"issue": issue_id, "agent": agent_id})


async def issueless_run(tx: Tx, agent_id: str, status: str) -> Row | None:
    """The agent's newest issue-less run in ``status``, or None."""
    return await tx.fetchrow(_ISSUELESS_RUN, {"agent": agent_id, "status": status})


async def lock_run_context(tx: Tx, run_id: object) -> Row | None:
    """(status, context) of the run, locked FOR UPDATE; None when it is gone."""
    return await tx.fetchrow(_LOCK_RUN_CONTEXT, {"id": run_id})


async def set_run_context(tx: Tx, run_id: object, context_json: str) -> None:
    """Replace the run's context with the JSON ``context_json``."""
    await tx.execute(_SET_RUN_CONTEXT, {"id": run_id, "context": context_json})


async def insert_run(tx: Tx, params: Mapping[str, Any]) -> Row | None:
    """Insert a queued run (company, agent, issue, source, reason, wake, context)."""
    return await tx.fetchrow(_INSERT_RUN, params)


async def deferred_for(tx: Tx, agent_id: str, issue_id: str) -> Row | None:
    """The agent's deferred wake on the issue, locked FOR UPDATE, or None."""
    return await tx.fetchrow(_DEFERRED_FOR, {"agent": agent_id, "issue": issue_id})


async def merge_deferred(tx: Tx, wake_id: object, payload_json: str, reason: str) -> None:
    """Give a deferred wake a merged payload and the latest reason; count the merge."""
    await tx.execute(_MERGE_DEFERRED, {"id": wake_id, "payload": payload_json, "reason": reason})


async def any_active_issue_run(tx: Tx, issue_id: str) -> bool:
    """Whether the issue has a queued or running run."""
    return await tx.fetchval(_ANY_ACTIVE_ISSUE_RUN, {"issue": issue_id}) is not None


async def oldest_deferred(tx: Tx, issue_id: str) -> Row | None:
    """The issue's oldest deferred wake not locked by another transaction, locked."""
    return await tx.fetchrow(_OLDEST_DEFERRED, {"issue": issue_id})


async def next_deferred(tx: Tx, issue_id: str) -> Row | None:
    """The issue's oldest deferred wake while it has no active run; no locks."""
    return await tx.fetchrow(_NEXT_DEFERRED, {"issue": issue_id})


async def fail_deferred(tx: Tx, wake_id: object, why: str) -> None:
    """End a deferred wake as ``failed`` with the reason ``why``."""
    await tx.execute(_FAIL_DEFERRED, {"id": wake_id, "why": why})


async def skip_deferred(tx: Tx, wake_id: object, why: str) -> None:
    """End a deferred wake as ``skipped`` with the reason ``why``."""
    await tx.execute(_SKIP_DEFERRED, {"id": wake_id, "why": why})


async def promote_deferred(tx: Tx, wake_id: object, run_id: object) -> None:
    """Mark a deferred wake ``queued`` for the run queued for it."""
    await tx.execute(_PROMOTE_DEFERRED, {"id": wake_id, "run": run_id})
