"""A run whose process is gone: its terminal write (``failed`` ``process_lost``) and, in
the same transaction, its one automatic retry (a new queued run with its wakeup row,
``retry_of_run_id`` the lost run), refused by the one-active-run index when the agent
already has another active run on the issue."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import asyncpg

from common import metrics
from common.db import Database
from common.sql import Row, Tx, sql
from run_service import run_store, wakes

logger = logging.getLogger("run_service.recovery")

LOST_CODE = "process_lost"
RETRY_REASON = "process_lost"
RETRY_WAKE_REASON = "process_lost_retry"
RETRY_EVENT = "Queued automatic retry after orphaned child process was confirmed dead"

_LOST = sql(
    """
    UPDATE runs.heartbeat_runs
    SET status = 'failed', error_code = 'process_lost', error = :error,
        finished_at = now(), updated_at = now()
    WHERE id = :id AND status = 'running' AND supervisor_node_id = :me
    RETURNING id
    """
)
_FAIL_WAKE = sql(
    """
    UPDATE runs.wakeup_requests SET status = 'failed', finished_at = now()
    WHERE status IN ('queued', 'claimed') AND (run_id = :run OR id = :wake)
    """
)
_RUNTIME_STATE = sql(
    """
    INSERT INTO runs.agent_runtime_state
        (agent_id, last_run_id, last_run_status, last_error, last_heartbeat_at, updated_at)
    VALUES (:agent, :run, 'failed', :error, now(), now())
    ON CONFLICT (agent_id) DO UPDATE
    SET last_run_id = EXCLUDED.last_run_id, last_run_status = EXCLUDED.last_run_status,
        last_error = EXCLUDED.last_error, last_heartbeat_at = EXCLUDED.last_heartbeat_at,
        updated_at = EXCLUDED.updated_at
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


async def write_lost(
    db: Database, node_id: str, run: Row, message: str, extra: dict[str, Any]
) -> str | None:
    """The terminal write of a lost run and, in the same transaction, its retry; the
    retry's id (None: no retry)."""
    run_id = str(run["id"])
    retry = int(run["process_loss_retry_count"]) < 1
    async with db.unit_of_work() as tx:
        error = message + ("; retrying once" if retry else "")
        done = await tx.fetchval(_LOST, {"id": run_id, "me": node_id, "error": error})
        if done is None:
            return None  # cancelled meanwhile: that outcome stands
        payload: dict[str, Any] = {
            "terminal": True,
            "status": "failed",
            "error_code": LOST_CODE,
            "error": error,
            "stopReason": LOST_CODE,
        }
        await run_store.append_events(
            tx,
            run_id,
            [
                ("error", error, {"error_code": LOST_CODE, **extra}),
                ("lifecycle", "run failed", payload),
            ],
        )
        await tx.execute(_FAIL_WAKE, {"run": run_id, "wake": run["wakeup_request_id"]})
        await tx.execute(_RUNTIME_STATE, {"agent": run["agent_id"], "run": run_id, "error": error})
        retry_id = await insert_retry(tx, run) if retry else None
    metrics.count_outcome("failed", LOST_CODE)
    logger.warning(
        "run process lost", extra={"run_id": run_id, "retry_run_id": retry_id, "error": error}
    )
    return retry_id


async def insert_retry(tx: Tx, run: Row) -> str | None:
    """The queued retry of a lost run and its wakeup row (None if the agent already has
    another active run on the issue)."""
    context = _json_object(run["context"])
    context.update({"retryReason": RETRY_REASON, "wakeReason": RETRY_WAKE_REASON})
    context["retryOfRunId"] = str(run["id"])
    wake_id = str(uuid.uuid4())
    source = run["invocation_source"] or "automation"
    params = {
        "company": run["company_id"],
        "agent": run["agent_id"],
        "issue": run["issue_id"],
        "source": source,
        "reason": RETRY_WAKE_REASON,
        "detail": run["trigger_detail"],
        "wake": wake_id,
        "old": run["id"],
        "retry_reason": RETRY_REASON,
        "count": int(run["process_loss_retry_count"]) + 1,
        "context": json.dumps(context),
    }
    try:
        async with tx.conn.transaction():
            retry_id = await tx.fetchval(_INSERT_RETRY, params)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != wakes.ONE_ACTIVE_RUN_INDEX:
            raise
        return None
    await tx.execute(
        _INSERT_RETRY_WAKE,
        {
            "id": wake_id,
            "company": run["company_id"],
            "agent": run["agent_id"],
            "source": source,
            "reason": RETRY_WAKE_REASON,
            "issue": run["issue_id"],
            "payload": json.dumps(context),
            "run": retry_id,
        },
    )
    await run_store.append_events(
        tx, str(retry_id), [("lifecycle", RETRY_EVENT, {"retryOfRunId": str(run["id"])})]
    )
    return str(retry_id)


def lost_message(
    run: Row, local: bool, node_host: str | None, descendants_killed: bool
) -> tuple[str, dict[str, Any]]:
    pid = run["process_pid"]
    pgid = run["process_group_id"]
    if not pid:
        return (
            "Process lost -- the run was claimed but ended before an adapter child process "
            "was recorded",
            {"stalePreSpawnActiveRun": True},
        )
    if not local:
        host = node_host or "?"
        return (
            f"Process lost -- server may have restarted (supervisor node on host {host} is "
            f"gone; child pid {pid} cannot be checked from here)",
            {"pid": pid, "host": host},
        )
    if descendants_killed:
        return (
            f"Process lost -- parent pid {pid} exited, but descendant process group {pgid} "
            "was still alive and was terminated",
            {"pid": pid, "process_group_id": pgid, "descendantOnly": True},
        )
    return f"Process lost -- child pid {pid} is no longer running", {"pid": pid}


def _json(value: object) -> dict[str, Any]:
    if isinstance(value, str):
        loaded = json.loads(value)
        return dict(loaded) if isinstance(loaded, dict) else {}
    return dict(value) if isinstance(value, dict) else {}


def _json_object(value: object) -> dict[str, Any]:
    if isinstance(value, str):
        loaded = json.loads(value)
        return dict(loaded) if isinstance(loaded, dict) else {}
    return dict(value) if isinstance(value, dict) else {}
