"""Stranded agent-assigned issues: ``ReconcileStrandedIssues`` and its periodic job.

A *candidate* is an issue assigned to an agent (never to a user) in ``todo`` or
``in_progress``, whose agent is active and in the issue's company, with no queued or
running run and no deferred wake on the issue: nothing will ever move it forward on its
own. The decision is keyed on the latest run of (agent, issue):

============  =====================================================  ===================
issue         latest run                                             action
============  =====================================================  ===================
todo          none, or succeeded                                     skip
todo          unsuccessful, retry_reason ``assignment_recovery``     escalate
todo          anything else                                          requeue dispatch
in_progress   none, and no checkout/execution link                   skip
in_progress   unsuccessful, retry_reason ``issue_continuation_...``  escalate
in_progress   anything else (a success that left it open too)        requeue continuation
============  =====================================================  ===================

A requeue is a wake (source ``automation``) with reason ``issue_assignment_recovery`` or
``issue_continuation_needed``; the run it queues records ``retry_reason``
(``assignment_recovery`` / ``issue_continuation_needed``) and ``retry_of_run_id`` = the
latest run. The wake's idempotency key names the issue and the latest run, so the same
situation is never requeued twice. Each requeue is its own transaction which first takes
the issue's wake lock and re-decides on fresh rows (a wake or a finished run may have
changed things since the candidate was read).

Escalation is ``EscalateStrandedIssue`` on the issue service (blocked + one comment by
the system) with the idempotency key ``stranded:<issue>:<latest run>``: a repeated pass
never adds a second comment.

One replica at a time: a pass holds ``pg_try_advisory_xact_lock`` for its duration;
another replica's pass returns empty counters. A pass reads at most ``limit`` candidates
(actionable ones first), through the assignee, run-by-issue and deferred-wake indexes.
``skipped`` counts candidates read with nothing to do (decision table skips, wakes that
were refused or merged into a run that appeared meanwhile, escalations already made);
issues excluded up front (live run, deferred wake, agent not invokable) are not counted.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Collection
from dataclasses import dataclass, field

import grpc
import grpc.aio

from common import metrics
from common.actor import Actor, service_actor, sign_actor
from common.authz import require_instance_admin
from common.channels import backend_channel
from common.config import Settings
from common.db import Database
from common.errors import PaperclipError
from common.sql import Row, Tx
from paperclip.issues.v1 import issue_locks_pb2, issue_locks_pb2_grpc
from paperclip.runs.v1 import runs_pb2
from run_service import issue_client, stranded_store, wake_store
from run_service.runner import Runner
from run_service.wakes import enqueue_wake

logger = logging.getLogger(__name__)

SERVICE_NAME = "run_service"
#: Candidates read per pass.
DEFAULT_LIMIT = 500
#: Seconds between two periodic passes.
INTERVAL_SECONDS = 60.0
#: Deadline of one EscalateStrandedIssue call.
CALL_TIMEOUT_SECONDS = 10.0
SUMMARY_MAX = 240
WAKE_SOURCE = "automation"
DISPATCH_REASON = "issue_assignment_recovery"
DISPATCH_RETRY = "assignment_recovery"
CONTINUATION_REASON = "issue_continuation_needed"
CONTINUATION_RETRY = "issue_continuation_needed"
UNSUCCESSFUL = frozenset({"failed", "cancelled", "timed_out"})
PASS_LOCK_KEY = "run_service.reconcile_stranded_issues"


class Action(enum.Enum):
    """What a pass does with one candidate."""

    SKIP = "skip"
    REQUEUE_DISPATCH = "requeue_dispatch"
    REQUEUE_CONTINUATION = "requeue_continuation"
    ESCALATE_DISPATCH = "escalate_dispatch"
    ESCALATE_CONTINUATION = "escalate_continuation"


def decide(
    issue_status: str,
    latest_status: str | None,
    latest_retry_reason: str | None,
    *,
    has_run_link: bool,
) -> Action:
    """The decision table of the module docstring (``latest_status`` None: no run yet)."""
    unsuccessful = latest_status in UNSUCCESSFUL
    if issue_status == "todo":
        if latest_status is None or latest_status == "succeeded":
            return Action.SKIP
        if unsuccessful and latest_retry_reason == DISPATCH_RETRY:
            return Action.ESCALATE_DISPATCH
        return Action.REQUEUE_DISPATCH
    if issue_status == "in_progress":
        if latest_status is None and not has_run_link:
            return Action.SKIP
        if unsuccessful and latest_retry_reason == CONTINUATION_RETRY:
            return Action.ESCALATE_CONTINUATION
        return Action.REQUEUE_CONTINUATION
    return Action.SKIP


def _decide_row(row: Row) -> Action:
    return decide(
        row["status"],
        row["run_status"],
        row["retry_reason"],
        has_run_link=row["checkout_run_id"] is not None or row["execution_run_id"] is not None,
    )


def escalation_body(action: Action, row: Row) -> str:
    """The comment of an escalation."""
    if action is Action.ESCALATE_DISPATCH:
        head = (
            "Paperclip automatically retried dispatch for this assigned issue, but it still "
            "has no live execution path."
        )
    else:
        head = (
            "Paperclip automatically retried continuation for this in-progress issue, but it "
            "still has no live execution path."
        )
    body = f"{head} Moving it to `blocked` so someone can look at it."
    if row["run_id"] is not None:
        code = row["error_code"] or row["run_status"]
        summary = (row["error"] or f"run {row['run_status']}").strip()
        summary = summary[:SUMMARY_MAX].rstrip().rstrip(".")
        body += f" Latest retry failure: `{code}` - {summary}."
    return body


# --- the pass -----------------------------------------------------------------------


@dataclass
class _Counters:
    dispatch_requeued: int = 0
    continuation_requeued: int = 0
    escalated: int = 0
    skipped: int = 0
    issue_ids: list[str] = field(default_factory=list)

    def to_proto(self) -> runs_pb2.ReconcileStrandedIssuesResponse:
        return runs_pb2.ReconcileStrandedIssuesResponse(
            dispatch_requeued=self.dispatch_requeued,
            continuation_requeued=self.continuation_requeued,
            escalated=self.escalated,
            skipped=self.skipped,
            issue_ids=self.issue_ids,
        )


async def reconcile_stranded_issues(
    db: Database,
    runner: Runner,
    actor: Actor,
    *,
    company_ids: Collection[str] | None = None,
    limit: int = DEFAULT_LIMIT,
) -> runs_pb2.ReconcileStrandedIssuesResponse:
    """One pass (instance admins and services). ``company_ids`` limits it to those
    companies (tests share one database); None covers every company."""
    require_instance_admin(actor)
    counters = _Counters()
    escalator = _Escalator(runner.settings)
    try:
        async with db.unit_of_work() as guard:
            if not await stranded_store.try_pass_lock(guard, PASS_LOCK_KEY):
                logger.info("stranded-issue pass skipped: another replica holds it")
                return counters.to_proto()
            rows = await stranded_store.candidates(guard, company_ids=company_ids, limit=limit)
            for row in rows:
                await _handle(db, escalator, actor, row, counters)
    finally:
        await escalator.close()
    if counters.issue_ids:
        logger.info(
            "stranded issues reconciled",
            extra={
                "dispatch_requeued": counters.dispatch_requeued,
                "continuation_requeued": counters.continuation_requeued,
                "escalated": counters.escalated,
                "skipped": counters.skipped,
            },
        )
    return counters.to_proto()


async def _handle(
    db: Database, escalator: _Escalator, actor: Actor, row: Row, counters: _Counters
) -> None:
    action = _decide_row(row)
    issue_id = str(row["issue_id"])
    if action is Action.SKIP:
        counters.skipped += 1
        return
    try:
        if action in (Action.REQUEUE_DISPATCH, Action.REQUEUE_CONTINUATION):
            done = await _requeue(db, actor, row)
            if done is Action.REQUEUE_DISPATCH:
                counters.dispatch_requeued += 1
            elif done is Action.REQUEUE_CONTINUATION:
                counters.continuation_requeued += 1
            else:
                counters.skipped += 1
                return
        else:
            key = f"stranded:{issue_id}:{row['run_id']}"
            if not await escalator.escalate(issue_id, escalation_body(action, row), key):
                counters.skipped += 1
                return
            counters.escalated += 1
    except PaperclipError:
        logger.exception("stranded issue not reconciled", extra={"issue_id": issue_id})
        counters.skipped += 1
        return
    counters.issue_ids.append(issue_id)


async def _requeue(db: Database, actor: Actor, row: Row) -> Action:
    """Queue the recovery run for one candidate, re-deciding on fresh rows under the
    issue's wake lock; the action taken (SKIP when nothing was queued)."""
    issue_id, agent_id = str(row["issue_id"]), str(row["agent_id"])
    async with db.unit_of_work() as tx:
        await wake_store.lock(tx, f"wake-issue:{issue_id}")
        fresh = await stranded_store.one_candidate(tx, issue_id, agent_id)
        if fresh is None:
            return Action.SKIP
        action = _decide_row(fresh)
        if action not in (Action.REQUEUE_DISPATCH, Action.REQUEUE_CONTINUATION):
            return Action.SKIP
        return await _queue_recovery(tx, actor, fresh, action)


async def _queue_recovery(tx: Tx, actor: Actor, row: Row, action: Action) -> Action:
    dispatch = action is Action.REQUEUE_DISPATCH
    reason = DISPATCH_REASON if dispatch else CONTINUATION_REASON
    retry = DISPATCH_RETRY if dispatch else CONTINUATION_RETRY
    previous = str(row["run_id"]) if row["run_id"] is not None else None
    agent = await wake_store.agent_for_wake(tx, row["agent_id"])
    if agent is None:
        return Action.SKIP
    payload: dict[str, object] = {
        "issueId": str(row["issue_id"]),
        "retryReason": retry,
        "source": "stranded_issue_recovery",
    }
    if previous is not None:
        payload["retryOfRunId"] = previous
    wake, run = await enqueue_wake(
        tx,
        agent=agent,
        source=WAKE_SOURCE,
        reason=reason,
        issue_id=str(row["issue_id"]),
        payload=payload,
        idempotency_key=f"recovery:{row['issue_id']}:{previous or 'none'}",
        requested_by=actor,
    )
    if run is None or wake["status"] != "queued":
        return Action.SKIP
    await stranded_store.mark_retry(tx, run["id"], previous, retry)
    return action


class _Escalator:
    """``EscalateStrandedIssue`` on the issue service, signed as the run service."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._stub: issue_locks_pb2_grpc.IssueLockServiceAsyncStub | None = None

    async def escalate(self, issue_id: str, body: str, key: str) -> bool:
        """Whether this call escalated (False: the key was used before)."""
        if self._stub is None:
            self._channel = backend_channel(
                self._settings.issue_service_addr,
                idempotent_methods=issue_client.IDEMPOTENT_METHODS,
                setting="PAPERCLIP_ISSUE_SERVICE_ADDR",
            )
            self._stub = issue_locks_pb2_grpc.IssueLockServiceStub(self._channel)
        metadata = sign_actor(service_actor(SERVICE_NAME), self._settings.internal_key)
        reply = await self._stub.EscalateStrandedIssue(
            issue_locks_pb2.EscalateStrandedIssueRequest(
                issue_id=issue_id, body=body, idempotency_key=key
            ),
            metadata=metadata,
            timeout=CALL_TIMEOUT_SECONDS,
        )
        return bool(reply.escalated)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


async def reconcile_forever(
    db: Database, runner: Runner, *, interval: float = INTERVAL_SECONDS
) -> None:
    """A pass every ``interval`` seconds until cancelled (a failed pass is logged)."""
    actor = service_actor(SERVICE_NAME)
    while True:
        try:
            await metrics.timed_pass("run_reconcile", reconcile_stranded_issues(db, runner, actor))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("stranded-issue pass failed; retrying after the interval")
        await asyncio.sleep(interval)
