"""Reaping a run whose process is gone, once recovery (:mod:`run_service.recovery`) has
claimed it from its dead node.

Left-over members of its process group are killed first (TERM, grace, KILL, create-time
checked); a run with no recorded pid was claimed but never spawned (reference B21). Then
its terminal write (``failed`` ``process_lost``) and, in the same transaction, **exactly
one** automatic retry when ``process_loss_retry_count < 1``: a new queued run with its
wakeup row (``retry_of_run_id`` the lost run, count + 1, retry reason ``process_lost``,
wake reason ``process_lost_retry``), refused by the one-active-run index when the agent
already has another active run on the issue. After commit ``TransferExecutionLock``
moves the issue's lock to the retry (only if the old run still holds it). Without a retry
(or if the retry cannot be inserted), ``ReleaseRunLocks`` + promotion of a deferred wake,
as for any ended run. A second retry never happens."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import asyncpg

from common import metrics
from common.db import Database
from common.errors import FailedPrecondition, PaperclipError
from common.protoconv import text_or_none
from common.sql import Row, Tx
from run_service import finalize, recovery_store, run_store, terminal_store, wake_rules, wakes
from run_service.adopted_runs import grace_of
from run_service.issue_client import IssueClient
from run_service.workspace_client import WorkspaceClient
from supervision.process_tree import group_members, kill_tree

logger = logging.getLogger("run_service.recovery")

LOST_CODE = "process_lost"
RETRY_REASON = "process_lost"
RETRY_WAKE_REASON = "process_lost_retry"
RETRY_EVENT = "Queued automatic retry after orphaned child process was confirmed dead"


async def reap(
    db: Database, node_id: str, run: Row, *, local: bool, node_host: str | None
) -> str | None:
    """Reap a run claimed by ``node_id`` whose process is gone: kill what is left of its
    process group (``local``: it ran on this host), then :func:`write_lost`; the retry's
    id (None: no retry). ``node_host``: the host of its dead node (None: no node)."""
    pid = run["process_pid"]
    started = run["process_started_at"]
    create_time = started.timestamp() if started is not None else 0.0
    pgid = int(run["process_group_id"] or 0)
    descendants_killed = False
    if local and pid and started is not None and pgid and group_members(pgid, create_time):
        descendants_killed = True
        await kill_tree(int(pid), pgid, create_time, grace_of(run))
    message, extra = lost_message(run, local, node_host, descendants_killed)
    return await write_lost(db, node_id, run, message, extra)


async def after_lost(
    db: Database,
    issues: IssueClient,
    workspaces: WorkspaceClient,
    run: Row,
    retry_id: str | None,
) -> None:
    """The issue-service steps after a lost run's terminal write: the lock moves to the
    retry, or (no retry) the run's locks are released as for any ended run."""
    run_id = str(run["id"])
    issue_id = text_or_none(run["issue_id"])
    if retry_id is None:
        await finalize.after_terminal(db, issues, run_id, issue_id, workspaces=workspaces)
        return
    if issue_id is not None:
        await _transfer_lock(issues, issue_id, run_id, retry_id)
    # Whatever the old run still holds (nothing after a transfer) is released; its
    # environment leases end with it (the retry acquires its own).
    await asyncio.gather(
        issues.release_run_locks(run_id),
        finalize.release_run_leases(db, workspaces, run_id),
    )


async def _transfer_lock(issues: IssueClient, issue_id: str, run_id: str, retry_id: str) -> None:
    """``TransferExecutionLock`` from the lost run to its retry; a refusal is logged."""
    try:
        await issues.transfer_execution_lock(
            issue_id=issue_id, from_run_id=run_id, to_run_id=retry_id
        )
    except FailedPrecondition as exc:
        logger.info(
            "lock not transferred to the retry",
            extra={"run_id": run_id, "issue_id": issue_id, "reason": exc.reason},
        )
    except PaperclipError as exc:
        logger.warning(
            "TransferExecutionLock failed; the retry acquires the lock itself",
            extra={"run_id": run_id, "issue_id": issue_id, "reason": exc.reason},
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
        if not await recovery_store.mark_lost(tx, run_id, me=node_id, error=error):
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
        await terminal_store.finish_wake(tx, run_id, run["wakeup_request_id"], "failed")
        await terminal_store.record_runtime_state(tx, run["agent_id"], run_id, "failed", error)
        retry_id = await insert_retry(tx, run) if retry else None
    metrics.count_outcome("failed", LOST_CODE)
    logger.warning(
        "run process lost", extra={"run_id": run_id, "retry_run_id": retry_id, "error": error}
    )
    return retry_id


async def insert_retry(tx: Tx, run: Row) -> str | None:
    """The queued retry of a lost run and its wakeup row (None if the agent already has
    another active run on the issue)."""
    context = wake_rules.as_json(run["context"])
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
            retry_id = await recovery_store.insert_retry_run(tx, params)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != wakes.ONE_ACTIVE_RUN_INDEX:
            raise
        return None
    await recovery_store.insert_retry_wake(
        tx,
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
        tx, retry_id, [("lifecycle", RETRY_EVENT, {"retryOfRunId": str(run["id"])})]
    )
    return retry_id


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
