"""SQL of a run's terminal write: the run row, its wakeup request and the agent's
runtime state, for a run that ended (``run_service.finalize``), was cancelled
(``run_service.run_control``) or lost its process (``run_service.lost_runs``).

Every function takes the connection of the caller's unit of work; none commits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from common.sql import Row, Tx, sql
from run_service.run_store import RUN_COLUMNS

_TERMINAL_UPDATE = sql(
    """
    UPDATE runs.heartbeat_runs
    SET status = :status, error_code = :error_code, error = :error,
        exit_code = :exit_code, signal = :signal, finished_at = now(), updated_at = now(),
        stdout_bytes = coalesce(:stdout_bytes, stdout_bytes),
        stderr_bytes = coalesce(:stderr_bytes, stderr_bytes),
        log_truncated = log_truncated OR coalesce(:truncated, false)
    WHERE id = :id AND status = ANY(CAST(:from_statuses AS text[]))
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
_CANCEL = sql(
    f"""
    UPDATE runs.heartbeat_runs
    SET status = 'cancelled', finished_at = now(), updated_at = now(),
        error_code = 'cancelled', error = :error
    WHERE id = :id AND status = :from_status
    RETURNING {RUN_COLUMNS}
    """
)


async def finish_run(
    tx: Tx, run_id: str, from_statuses: Sequence[str], result: Mapping[str, Any]
) -> Row | None:
    """Write the terminal ``result`` (status, error_code, error, exit_code, signal,
    stdout_bytes, stderr_bytes, truncated) while the run is in one of ``from_statuses``;
    its (agent_id, issue_id, wakeup_request_id), None when it was not."""
    return await tx.fetchrow(
        _TERMINAL_UPDATE, {"id": run_id, "from_statuses": list(from_statuses), **result}
    )


async def finish_wake(tx: Tx, run_id: str, wake_id: object, status: str) -> None:
    """End the run's queued or claimed wake with ``status``."""
    await tx.execute(_FINISH_WAKE, {"status": status, "run": run_id, "wake": wake_id})


async def record_runtime_state(
    tx: Tx, agent_id: object, run_id: str, status: str, error: str | None
) -> None:
    """Record the run as the agent's last run (race-free upsert)."""
    await tx.execute(
        _RUNTIME_STATE, {"agent": agent_id, "run": run_id, "status": status, "error": error}
    )


async def cancel_run(tx: Tx, run_id: str, error: str, *, from_status: str) -> Row | None:
    """Cancel the run while it is in ``from_status``; its row, None when it was not."""
    return await tx.fetchrow(_CANCEL, {"id": run_id, "error": error, "from_status": from_status})
