"""The rows of a run this node executes: its process identity and limits once spawned,
its output progress, and the claimed runs of a node that never recorded a process."""

from __future__ import annotations

from datetime import datetime

from common.sql import Tx, sql

_MARK_STARTED = sql(
    """
    UPDATE runs.heartbeat_runs
    SET process_pid = :pid, process_group_id = :pgid, process_started_at = :created,
        supervisor_node_id = :node, last_activity_at = now(), updated_at = now(),
        timeout_seconds = :timeout, idle_timeout_seconds = :idle, grace_seconds = :grace
    WHERE id = :id AND status = 'running'
    RETURNING id
    """
)
_LOCK_RUN_STATUS = sql("SELECT status FROM runs.heartbeat_runs WHERE id = :id FOR UPDATE")
_OUTPUT_PROGRESS = sql(
    """
    UPDATE runs.heartbeat_runs
    SET stdout_bytes = :out, stderr_bytes = :err, log_truncated = log_truncated OR :cut,
        last_output_at = now(), last_activity_at = now(), updated_at = now()
    WHERE id = :id
    """
)
#: A node's claimed runs that never recorded a process (requeued on a graceful stop).
_UNSPAWNED = sql(
    """
    SELECT id FROM runs.heartbeat_runs
    WHERE supervisor_node_id = :id AND status = 'running' AND process_pid IS NULL
    """
)


async def mark_started(
    tx: Tx,
    run_id: str,
    *,
    pid: int,
    pgid: int,
    created: datetime,
    node_id: str,
    timeout_seconds: int,
    idle_timeout_seconds: int,
    grace_seconds: int,
) -> bool:
    """Record the process identity, the node and the limits snapshot of a ``running``
    run; False when the run is no longer ``running``."""
    row = await tx.fetchval(
        _MARK_STARTED,
        {
            "id": run_id,
            "pid": pid,
            "pgid": pgid,
            "created": created,
            "node": node_id,
            "timeout": timeout_seconds,
            "idle": idle_timeout_seconds,
            "grace": grace_seconds,
        },
    )
    return row is not None


async def lock_run_status(tx: Tx, run_id: str) -> str | None:
    """The run's status, its row locked FOR UPDATE (None: no such run)."""
    status: str | None = await tx.fetchval(_LOCK_RUN_STATUS, {"id": run_id})
    return status


async def record_output_progress(
    tx: Tx, run_id: str, *, stdout_bytes: int, stderr_bytes: int, truncated: bool
) -> None:
    """The run's output byte counts so far, whether its log was cut, and its last output
    and activity (now)."""
    await tx.execute(
        _OUTPUT_PROGRESS,
        {"id": run_id, "out": stdout_bytes, "err": stderr_bytes, "cut": truncated},
    )


async def unspawned_runs(tx: Tx, node_id: str) -> list[str]:
    """The node's ``running`` runs without a recorded process."""
    return [str(row["id"]) for row in await tx.fetch(_UNSPAWNED, {"id": node_id})]
