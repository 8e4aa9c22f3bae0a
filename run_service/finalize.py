"""The terminal write of a run, and what follows it once committed.

:func:`finalize_run` is idempotent: it writes only while the run is still ``queued`` or
``running``; a run already terminal (cancelled by ``CancelRun`` elsewhere, for instance)
keeps its status, and its terminal event stays its last event. In the same transaction:
the lifecycle terminal event (message ``run <status>``, payload ``{"terminal": true,
"status": ...}``; ``WatchRun`` ends after it), the wakeup request's final status, and the
agent's runtime state (``INSERT ... ON CONFLICT``, race-free).

:func:`after_terminal` runs *after* that commit (ARCHITECTURE, "Run ends"):
``ReleaseRunLocks`` on the issue service (retried until acknowledged), then the oldest
deferred wake of the run's issue is promoted to a queued run (``wakes.promote_deferred``;
the NOTIFY trigger on the new queued run wakes every dispatcher).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from common.db import Database
from common.sql import sql
from run_service import run_store, wakes
from run_service.issue_client import IssueClient
from run_service.supervisor import Outcome

logger = logging.getLogger(__name__)

_WAKE_STATUS = {"succeeded": "completed", "cancelled": "cancelled"}  # else: failed

_TERMINAL_UPDATE = sql(
    """
    UPDATE runs.heartbeat_runs
    SET status = :status, error_code = :error_code, error = :error,
        exit_code = :exit_code, signal = :signal, finished_at = now(), updated_at = now(),
        stdout_bytes = coalesce(:stdout_bytes, stdout_bytes),
        stderr_bytes = coalesce(:stderr_bytes, stderr_bytes),
        log_truncated = log_truncated OR coalesce(:truncated, false)
    WHERE id = :id AND status IN ('queued', 'running')
    RETURNING agent_id, issue_id, wakeup_request_id
    """
)
_FINISH_WAKE = sql(
    """
    UPDATE runs.wakeup_requests SET status = :status, finished_at = now()
    WHERE status IN ('queued', 'claimed') AND (run_id = :run OR id = :wake)
    """
)
_RUNTIME_STATE = sql(
    """
    INSERT INTO runs.agent_runtime_state
        (agent_id, last_run_id, last_run_status, last_error, last_heartbeat_at, updated_at)
    VALUES (:agent, :run, :status, :error, now(), now())
    ON CONFLICT (agent_id) DO UPDATE
    SET last_run_id = EXCLUDED.last_run_id, last_run_status = EXCLUDED.last_run_status,
        last_error = EXCLUDED.last_error, last_heartbeat_at = EXCLUDED.last_heartbeat_at,
        updated_at = EXCLUDED.updated_at
    """
)


@dataclass(frozen=True)
class RunResult:
    """How a run ended, as its row records it."""

    status: str  # succeeded | failed | cancelled | timed_out
    error_code: str | None = None
    error: str | None = None
    exit_code: int | None = None
    signal: str | None = None
    stdout_bytes: int | None = None
    stderr_bytes: int | None = None
    truncated: bool | None = None


def result_of(outcome: Outcome, *, cancel_reason: str | None = None) -> RunResult:
    """The run result of a supervised process's outcome.

    exit 0 -> succeeded; any other exit or a signal from outside -> failed
    ``adapter_failed``; the wall-clock / idle limits -> timed_out ``timeout`` /
    ``idle_timeout``; a cancel -> cancelled ``cancelled`` (error: the reason)."""
    counts: dict[str, Any] = {
        "exit_code": outcome.exit_code,
        "signal": outcome.signal,
        "stdout_bytes": outcome.stdout_bytes,
        "stderr_bytes": outcome.stderr_bytes,
        "truncated": outcome.truncated,
    }
    if outcome.reason == "cancelled":
        return RunResult(
            "cancelled", "cancelled", cancel_reason or "cancelled by control plane", **counts
        )
    if outcome.reason == "timeout":
        return RunResult("timed_out", "timeout", outcome.detail, **counts)
    if outcome.reason == "idle_timeout":
        return RunResult("timed_out", "idle_timeout", outcome.detail, **counts)
    if outcome.succeeded:
        return RunResult("succeeded", **counts)
    return RunResult("failed", "adapter_failed", f"Process {outcome.detail}", **counts)


async def finalize_run(db: Database, run_id: str, result: RunResult) -> bool:
    """The terminal write (see the module docstring); True if this call made it."""
    async with db.unit_of_work() as tx:
        row = await tx.fetchrow(
            _TERMINAL_UPDATE,
            {
                "id": run_id,
                "status": result.status,
                "error_code": result.error_code,
                "error": result.error,
                "exit_code": result.exit_code,
                "signal": result.signal,
                "stdout_bytes": result.stdout_bytes,
                "stderr_bytes": result.stderr_bytes,
                "truncated": result.truncated,
            },
        )
        if row is None:
            return False
        payload: dict[str, Any] = {"terminal": True, "status": result.status}
        for name in ("error_code", "error", "exit_code", "signal"):
            value = getattr(result, name)
            if value is not None:
                payload[name] = value
        await run_store.append_events(tx, run_id, [("lifecycle", f"run {result.status}", payload)])
        await tx.execute(
            _FINISH_WAKE,
            {
                "status": _WAKE_STATUS.get(result.status, "failed"),
                "run": run_id,
                "wake": row["wakeup_request_id"],
            },
        )
        await tx.execute(
            _RUNTIME_STATE,
            {
                "agent": row["agent_id"],
                "run": run_id,
                "status": result.status,
                "error": result.error,
            },
        )
    logger.info(
        "run finished",
        extra={"run_id": run_id, "status": result.status, "error_code": result.error_code},
    )
    return True


async def after_terminal(
    db: Database, issues: IssueClient, run_id: str, issue_id: str | None
) -> str | None:
    """After the terminal commit: release the run's issue locks (retried until
    acknowledged), then promote the oldest deferred wake of its issue. The id of the run
    queued by the promotion, if any."""
    released = await issues.release_run_locks(run_id)
    if released is None:
        logger.warning(
            "run locks not released (the stale-lock sweep will)", extra={"run_id": run_id}
        )
    if issue_id is None:
        return None
    try:
        promoted = await wakes.promote_deferred(db, issue_id)
    except Exception:
        logger.exception(
            "promoting a deferred wake failed", extra={"run_id": run_id, "issue_id": issue_id}
        )
        return None
    if promoted is not None:
        logger.info(
            "deferred wake promoted",
            extra={"run_id": run_id, "issue_id": issue_id, "promoted_run_id": promoted},
        )
    return promoted
