"""The terminal write of a run, and what follows it once committed.

:func:`finalize_run` is idempotent: it writes only while the run is still ``queued`` or
``running``; a run already terminal (cancelled by ``CancelRun`` elsewhere, for instance)
keeps its status, and its terminal event stays its last event. In the same transaction:
the lifecycle terminal event (message ``run <status>``, payload ``{"terminal": true,
"status": ...}``; ``WatchRun`` ends after it), the wakeup request's final status, and the
agent's runtime state (``INSERT ... ON CONFLICT``, race-free).

:func:`after_terminal` runs *after* that commit (docs/architecture.md, "Run ends"):

1. ``ReleaseRunLocks`` on the issue service (retried until acknowledged), and beside
   it (concurrently, so it never delays what follows) ``ReleaseRunLeases`` on the
   workspace service;
2. the **comment policy**:
   a succeeded issue run woken by ``issue_assigned`` or ``execution_*`` that wrote no
   comment on its issue gets exactly one retry (reason ``missing_issue_comment``,
   ``retry_of_run_id`` = the run); a retry that again wrote none gets nothing. The
   outcome is recorded in the run's context as ``commentPolicy``;
3. the oldest deferred wake of the run's issue is promoted to a queued run
   (``wakes.promote_deferred``; the NOTIFY trigger on the new queued run wakes every
   dispatcher). A queued retry of step 2 holds the issue first: the wake then waits
   for the retry to end. When the wake's comments came from a board user and the issue
   was closed meanwhile, the issue is reopened (``ReopenIssue``) *before* the run is
   queued, so that the promoted run finds it open (``wakes.reopen_wanted``).

Every step is safe to repeat: the policy's retry wake has an idempotency key and a
recorded outcome is never decided again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from common import metrics
from common.actor import service_actor
from common.db import Database
from common.errors import PaperclipError
from common.sql import Row, Tx
from run_service import (
    comment_policy_store,
    foreign_reads,
    run_store,
    terminal_store,
    wake_store,
    wakes,
)
from run_service import wake_rules as rules
from run_service.issue_client import IssueClient
from run_service.supervisor import Outcome
from run_service.workspace_client import WorkspaceClient

logger = logging.getLogger(__name__)

_WAKE_STATUS = {"succeeded": "completed", "cancelled": "cancelled"}  # else: failed

#: Comment policy: the wake reasons it applies to, the
#: reason of its one retry, and the outcomes recorded as ``context.commentPolicy``.
POLICY_REASONS = frozenset({"issue_assigned"})
POLICY_REASON_PREFIX = "execution_"
MISSING_COMMENT = "missing_issue_comment"
SATISFIED = "satisfied"
RETRY_QUEUED = "retry_queued"
RETRY_EXHAUSTED = "retry_exhausted"
#: The retry wake was refused (agent paused, wakes on demand off...): no retry.
RETRY_SKIPPED = "retry_skipped"
REOPEN_SOURCE = "deferred_comment"

#: The statuses a run may be finalized from.
ACTIVE_STATUSES = ("queued", "running")


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


async def finalize_run(
    db: Database,
    run_id: str,
    result: RunResult,
    *,
    from_statuses: tuple[str, ...] = ACTIVE_STATUSES,
) -> bool:
    """The terminal write (see the module docstring) while the run is in one of
    ``from_statuses``; True if this call made it."""
    async with db.unit_of_work() as tx:
        row = await terminal_store.finish_run(tx, run_id, from_statuses, asdict(result))
        if row is None:
            return False
        payload: dict[str, Any] = {"terminal": True, "status": result.status}
        for name in ("error_code", "error", "exit_code", "signal"):
            value = getattr(result, name)
            if value is not None:
                payload[name] = value
        await run_store.append_events(tx, run_id, [("lifecycle", f"run {result.status}", payload)])
        await terminal_store.finish_wake(
            tx, run_id, row["wakeup_request_id"], _WAKE_STATUS.get(result.status, "failed")
        )
        await terminal_store.record_runtime_state(
            tx, row["agent_id"], run_id, result.status, result.error
        )
    logger.info(
        "run finished",
        extra={"run_id": run_id, "status": result.status, "error_code": result.error_code},
    )
    metrics.count_outcome(result.status, result.error_code)
    return True


def _policy_applies(reason: object) -> bool:
    return isinstance(reason, str) and (
        reason in POLICY_REASONS or reason.startswith(POLICY_REASON_PREFIX)
    )


async def apply_comment_policy(db: Database, run_id: str) -> dict[str, Any] | None:
    """The comment policy for a terminal run (see the module docstring): the outcome
    recorded in its context (``{"outcome": ..., ...}``), or None when it does not apply
    (not succeeded, no issue, another wake reason). Idempotent: an outcome already
    recorded is returned as it is."""
    async with db.unit_of_work() as tx:
        run = await comment_policy_store.lock_policy_run(tx, run_id)
        if run is None or run["status"] != "succeeded" or run["issue_id"] is None:
            return None
        context = rules.as_json(run["context"])
        recorded = context.get("commentPolicy")
        if isinstance(recorded, dict):
            return recorded
        is_retry = MISSING_COMMENT in (run["retry_reason"], run["wake_reason"])
        if not is_retry and not (
            _policy_applies(run["wake_reason"]) or _policy_applies(context.get("wakeReason"))
        ):
            return None
        issue_id = str(run["issue_id"])
        comment = await foreign_reads.run_comment_id(tx, issue_id, run_id)
        if comment is not None:
            outcome: dict[str, Any] = {"outcome": SATISFIED, "commentId": str(comment)}
        elif is_retry:
            outcome = {"outcome": RETRY_EXHAUSTED}
        else:
            outcome = await _queue_comment_retry(tx, run)
        await comment_policy_store.record_outcome(tx, run_id, json.dumps(outcome))
    logger.info("comment policy", extra={"run_id": run_id, **outcome})
    return outcome


async def _queue_comment_retry(tx: Tx, run: Row) -> dict[str, Any]:
    """The one ``missing_issue_comment`` retry of ``run``, as a wake of its agent on its
    issue (it coalesces, defers or is skipped like any wake); the policy outcome."""
    run_id, issue_id = str(run["id"]), str(run["issue_id"])
    agent = await wake_store.agent_for_wake(tx, run["agent_id"])
    if agent is None:
        return {"outcome": RETRY_SKIPPED, "skipReason": "agent_not_found"}
    wake, retry = await wakes.enqueue_wake(
        tx,
        agent=agent,
        source="automation",
        reason=MISSING_COMMENT,
        issue_id=issue_id,
        payload={"issueId": issue_id, "retryOfRunId": run_id, "retryReason": MISSING_COMMENT},
        idempotency_key=f"{MISSING_COMMENT}:{run_id}",
        requested_by=service_actor("run_service"),
    )
    if wake["status"] == "skipped":
        return {"outcome": RETRY_SKIPPED, "skipReason": wake["skip_reason"]}
    outcome: dict[str, Any] = {"outcome": RETRY_QUEUED, "wakeupRequestId": str(wake["id"])}
    if retry is not None:
        await comment_policy_store.mark_retry(tx, retry["id"], run_id, MISSING_COMMENT)
        outcome["retryRunId"] = str(retry["id"])
    return outcome


async def after_terminal(
    db: Database,
    issues: IssueClient,
    run_id: str,
    issue_id: str | None,
    *,
    workspaces: WorkspaceClient | None = None,
) -> str | None:
    """After the terminal commit: release the run's issue locks (retried until
    acknowledged), apply the comment policy, then promote the oldest deferred wake of
    its issue (reopening the issue first when the wake asks for it). Beside those
    steps, not before them, the run's environment leases are released through
    ``workspaces`` (without one, the workspace service's sweep does it). The id of the
    run queued by the promotion, if any."""
    promoted, _ = await asyncio.gather(
        _release_locks_and_promote(db, issues, run_id, issue_id),
        release_run_leases(db, workspaces, run_id),
    )
    return promoted


async def release_run_leases(db: Database, workspaces: WorkspaceClient | None, run_id: str) -> None:
    """Ask the workspace service to end the leases of the terminal run, with the status
    it ended with. Never raises: a failure is logged (the client logs why it gave up)
    and left to the workspace service's lease sweep."""
    if workspaces is None:
        return
    try:
        async with db.unit_of_work() as tx:
            run = await run_store.get_run(tx, run_id)
        status = "" if run is None else str(run["status"])
        released = await workspaces.release_run_leases(run_id, status)
    except Exception:
        logger.exception("releasing the run's leases failed", extra={"run_id": run_id})
        return
    if released:
        logger.info("run leases released", extra={"run_id": run_id, "lease_ids": released})


async def _release_locks_and_promote(
    db: Database, issues: IssueClient, run_id: str, issue_id: str | None
) -> str | None:
    released = await issues.release_run_locks(run_id)
    if released is None:
        logger.warning(
            "run locks not released (the stale-lock sweep will)", extra={"run_id": run_id}
        )
    if issue_id is None:
        return None
    try:
        await apply_comment_policy(db, run_id)
    except Exception:
        logger.exception("comment policy failed", extra={"run_id": run_id, "issue_id": issue_id})
    try:
        await _reopen_for_promotion(db, issues, run_id, issue_id)
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


async def _reopen_for_promotion(
    db: Database, issues: IssueClient, run_id: str, issue_id: str
) -> None:
    """Reopen the issue when the wake about to be promoted asks for it. A failed call is
    logged and the wake promoted anyway (its run then finds the issue closed)."""
    wake = await wakes.next_deferred(db, issue_id)
    if wake is None or not await wakes.reopen_wanted(db, wake, run_id):
        return
    try:
        reopened_from = await issues.reopen_issue(issue_id=issue_id, source=REOPEN_SOURCE)
    except PaperclipError as exc:
        logger.warning(
            "reopening the issue for a deferred comment wake failed",
            extra={"run_id": run_id, "issue_id": issue_id, "reason": exc.reason},
        )
        return
    logger.info(
        "issue reopened for a deferred comment wake",
        extra={"run_id": run_id, "issue_id": issue_id, "reopened_from": reopened_from},
    )
