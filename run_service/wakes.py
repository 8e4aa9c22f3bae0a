"""Wakes: ``WakeAgent``, the shared core the outbox consumer uses, and the promotion of
deferred wakes when an issue is released.

Every wake is its own record in ``runs.wakeup_requests``: ``queued`` (a run was queued
for it), ``coalesced`` (merged into a queued or running run, ``run_id`` set; or merged
into the agent's deferred wake for the issue, ``run_id`` null), ``deferred`` (one per
agent and issue, waiting for the run that holds the issue) or ``skipped`` with its
reason.

Serialization: a wake takes transaction-level advisory locks, first on its issue (if any)
then on its agent, before it reads anything. So two wakes of one agent, or two wakes of
one issue, never decide at the same time, and a repeated idempotency key is seen by the
second caller. Advisory locks (not a ``FOR UPDATE`` on the agent row) keep dispatchers,
which lock the agent row and then its queued runs, out of any lock cycle with a wake
that locks a run to merge into it. The partial unique index "one active run per
(agent, issue)" still guards against other writers (retries, recovery): a run insert
that loses that race is undone by its savepoint and the wake decides again (coalesce or
defer).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

import asyncpg

from common.actor import Actor
from common.authz import require_company_access
from common.db import Database
from common.errors import Aborted, NotFound, PermissionDenied
from common.sql import Row, Tx
from paperclip.runs.v1 import runs_pb2
from run_service import foreign_reads, run_store, wake_breaker, wake_store
from run_service import wake_rules as rules
from run_service.run_store import run_to_proto, wakeup_to_proto

ONE_ACTIVE_RUN_INDEX = "heartbeat_runs_one_active_per_agent_issue"
_ATTEMPTS = 5
#: The wake reason of a comment that reopened its issue (outbox ``issue.reopened``).
REOPENED_VIA_COMMENT = "issue_reopened_via_comment"
#: Issue statuses a promoted comment wake may reopen.
CLOSED_STATUSES = frozenset({"done", "cancelled"})


def _uuid_or_none(value: str | None) -> str | None:
    try:
        return str(uuid.UUID(value)) if value else None
    except ValueError:
        return None


async def enqueue_wake(
    tx: Tx,
    *,
    agent: Row,
    source: str,
    reason: str,
    issue_id: str | None,
    payload: dict[str, Any],
    idempotency_key: str | None,
    requested_by: Actor,
    source_event_id: int | None = None,
) -> tuple[Row, Row | None]:
    """Record one wake of ``agent`` in the caller's transaction: (its wakeup row, the
    run queued for it or None). A repeated idempotency key returns the first wake's
    row (and its queued run) and writes nothing."""
    agent_id = str(agent["id"])
    if issue_id is not None:
        await wake_store.lock(tx, f"wake-issue:{issue_id}")
    await wake_store.lock(tx, f"wake-agent:{agent_id}")
    if idempotency_key is not None:
        first = await wake_store.wake_by_key(tx, agent_id, idempotency_key)
        if first is not None:
            return first, await queued_run_of(tx, first)
    current = await wake_store.agent_for_wake(tx, agent_id)
    if current is None:
        raise NotFound("agent not found", reason="AGENT_NOT_FOUND", metadata={"id": agent_id})
    actor_type, actor_id, _, actor_run = requested_by.audit_identity()
    base: dict[str, Any] = {
        "company": current["company_id"],
        "agent": agent_id,
        "source": source,
        "reason": reason,
        "issue": issue_id,
        "payload": payload,
        "skip_reason": None,
        "run": None,
        "key": idempotency_key,
        "event": source_event_id,
        "actor_type": actor_type,
        "actor_id": actor_id,
        "actor_run": _uuid_or_none(actor_run),
    }
    skip = rules.precheck_skip(current, source=source, requested_by=requested_by)
    if skip is None and issue_id is not None:
        found = await foreign_reads.issue_in_company(tx, issue_id, current["company_id"])
        skip = None if found else rules.ISSUE_NOT_FOUND
    if skip is not None:
        return await _insert_wake(tx, base, status="skipped", skip_reason=skip), None
    context = rules.build_context(payload, source=source, reason=reason, issue_id=issue_id)
    for _ in range(_ATTEMPTS):
        if issue_id is not None:
            outcome = await _wake_for_issue(tx, base, context)
        else:
            outcome = await _wake_without_issue(tx, base, context)
        if outcome is not None:
            return outcome
    raise Aborted("the wake lost too many races; retry", reason="CONCURRENT_MODIFICATION")


async def _wake_for_issue(
    tx: Tx, base: dict[str, Any], context: dict[str, Any]
) -> tuple[Row, Row | None] | None:
    """One decision for a wake with an issue; None when a race changed the state."""
    active = await wake_store.active_issue_run(tx, base["issue"], base["agent"])
    if active is None:
        return await _queue_run(tx, base, context)
    same_agent = str(active["agent_id"]) == base["agent"]
    follow_up = active["status"] == "running" and rules.needs_follow_up(
        base["payload"], base["reason"]
    )
    if same_agent and not follow_up:
        return await _coalesce(tx, base, context, active)
    return await _defer(tx, base, context)


async def _wake_without_issue(
    tx: Tx, base: dict[str, Any], context: dict[str, Any]
) -> tuple[Row, Row | None] | None:
    """Coalesce into the agent's queued issue-less run, else its running one (unless a
    follow-up is needed), else queue a new run."""
    target = await wake_store.issueless_run(tx, base["agent"], "queued")
    if target is None and not rules.needs_follow_up(base["payload"], base["reason"]):
        target = await wake_store.issueless_run(tx, base["agent"], "running")
    if target is None:
        return await _queue_run(tx, base, context)
    return await _coalesce(tx, base, context, target)


async def _coalesce(
    tx: Tx, base: dict[str, Any], context: dict[str, Any], run: Row
) -> tuple[Row, Row | None] | None:
    """Merge ``context`` into the run's; None if the run ended meanwhile."""
    locked = await wake_store.lock_run_context(tx, run["id"])
    if locked is None or locked["status"] not in ("queued", "running"):
        return None
    merged = rules.merge_context(rules.as_json(locked["context"]), context)
    await wake_store.set_run_context(tx, run["id"], json.dumps(merged))
    wake = await _insert_wake(tx, base, status="coalesced", run=str(run["id"]))
    return wake, None


async def _defer(tx: Tx, base: dict[str, Any], context: dict[str, Any]) -> tuple[Row, Row | None]:
    """Merge into the (agent, issue) deferred wake, or become it."""
    deferred = await wake_store.deferred_for(tx, base["agent"], base["issue"])
    if deferred is None:
        wake = await _insert_wake(tx, {**base, "payload": context}, status="deferred")
        return wake, None
    merged = rules.merge_context(rules.as_json(deferred["payload"]), context)
    await wake_store.merge_deferred(tx, deferred["id"], json.dumps(merged), base["reason"])
    return await _insert_wake(tx, base, status="coalesced"), None


async def _queue_run(
    tx: Tx, base: dict[str, Any], context: dict[str, Any]
) -> tuple[Row, Row | None] | None:
    """Insert a queued run and its queued wake; None if another active run of the
    agent on the issue won the race (the savepoint undoes the insert). A wake the
    breaker stops (``wake_breaker``) is recorded skipped instead."""
    trip = await wake_breaker.check(tx, base)
    if trip is not None:
        return await _insert_wake(tx, base, status="skipped", skip_reason=trip.skip_reason), None
    wake_id = str(uuid.uuid4())
    run = await insert_queued_run(
        tx,
        company_id=str(base["company"]),
        agent_id=base["agent"],
        issue_id=base["issue"],
        source=base["source"],
        reason=base["reason"],
        wake_id=wake_id,
        context=context,
    )
    if run is None:
        return None
    wake = await _insert_wake(tx, {**base, "id": wake_id}, status="queued", run=str(run["id"]))
    return wake, run


async def insert_queued_run(
    tx: Tx,
    *,
    company_id: str,
    agent_id: str,
    issue_id: str | None,
    source: str,
    reason: str,
    wake_id: str,
    context: dict[str, Any],
) -> Row | None:
    """A queued run, or None when the agent already has an active run on the issue."""
    params = {
        "company": company_id,
        "agent": agent_id,
        "issue": issue_id,
        "source": source,
        "reason": reason,
        "wake": wake_id,
        "context": json.dumps(context),
    }
    try:
        async with tx.conn.transaction():
            return await wake_store.insert_run(tx, params)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != ONE_ACTIVE_RUN_INDEX:
            raise
        return None


async def _insert_wake(
    tx: Tx,
    base: dict[str, Any],
    *,
    status: str,
    skip_reason: str | None = None,
    run: str | None = None,
) -> Row:
    params = {
        "id": str(uuid.uuid4()),
        **base,
        "payload": json.dumps(base["payload"]),
        "status": status,
        "skip_reason": skip_reason,
        "run": run,
    }
    row = await wake_store.insert_wake(tx, params)
    if row is None:
        # Only possible if a writer bypassed the agent's advisory lock.
        raise Aborted("a wake with this idempotency key is being written", reason="WAKE_RACE")
    return row


async def queued_run_of(tx: Tx, wake: Row) -> Row | None:
    """The run queued for ``wake`` (none for coalesced, deferred or skipped wakes)."""
    if wake["run_id"] is None or wake["status"] == "coalesced":
        return None
    return await run_store.get_run(tx, wake["run_id"])


async def wake_agent(
    db: Database, actor: Actor, request: runs_pb2.WakeAgentRequest
) -> runs_pb2.WakeAgentResponse:
    """The ``WakeAgent`` RPC: board users with write access to the agent's company,
    or services. The outcome is in the wake's status; ``run`` only when one was queued."""
    if not (actor.is_board or actor.is_service):
        raise PermissionDenied("board access required", reason="BOARD_REQUIRED")
    fields = rules.validate_request(request)
    async with db.unit_of_work() as tx:
        agent = await wake_store.agent_for_wake(tx, fields["agent_id"])
        if agent is None:
            raise NotFound(
                "agent not found", reason="AGENT_NOT_FOUND", metadata={"id": fields["agent_id"]}
            )
        require_company_access(actor, str(agent["company_id"]), write=True)
        wake, run = await enqueue_wake(
            tx,
            agent=agent,
            source=fields["source"],
            reason=fields["reason"],
            issue_id=fields["issue_id"],
            payload=fields["payload"],
            idempotency_key=fields["idempotency_key"],
            requested_by=actor,
        )
    response = runs_pb2.WakeAgentResponse(wakeup_request=wakeup_to_proto(wake))
    if run is not None:
        response.run.CopyFrom(run_to_proto(run))
    return response


async def promote_deferred(db: Database, issue_id: str) -> str | None:
    """After the run holding ``issue_id`` ended and released it: queue a run for the
    oldest deferred wake of the issue and return its id. Wakes whose agent
    can no longer run are marked failed and the next one is tried; at most one wake is
    promoted per call; None when none is left or the issue already has an active run."""
    async with db.unit_of_work() as tx:
        # The same issue lock a wake takes: no wake of this issue decides meanwhile.
        await wake_store.lock(tx, f"wake-issue:{issue_id}")
        if await wake_store.any_active_issue_run(tx, issue_id):
            return None
        while True:
            wake = await wake_store.oldest_deferred(tx, issue_id)
            if wake is None:
                return None
            agent = await wake_store.agent_for_wake(tx, wake["agent_id"])
            if agent is None or agent["status"] != "active":
                await wake_store.fail_deferred(tx, wake["id"], rules.NOT_INVOKABLE)
                continue
            trip = await wake_breaker.check(
                tx,
                {
                    "company": wake["company_id"],
                    "agent": str(wake["agent_id"]),
                    "issue": issue_id,
                    "reason": wake["reason"],
                },
            )
            if trip is not None:
                await wake_store.skip_deferred(tx, wake["id"], trip.skip_reason)
                continue
            run = await insert_queued_run(
                tx,
                company_id=str(wake["company_id"]),
                agent_id=str(wake["agent_id"]),
                issue_id=issue_id,
                source=wake["source"],
                reason=wake["reason"],
                wake_id=str(wake["id"]),
                context=rules.as_json(wake["payload"]),
            )
            if run is None:
                return None
            await wake_store.promote_deferred(tx, wake["id"], run["id"])
            return str(run["id"])


async def next_deferred(db: Database, issue_id: str) -> Row | None:
    """The deferred wake :func:`promote_deferred` would promote next (the oldest), or
    None when there is none or the issue has an active run. A read, no locks."""
    async with db.unit_of_work() as tx:
        return await wake_store.next_deferred(tx, issue_id)


async def reopen_wanted(db: Database, wake: Row | Mapping[str, Any], finishing_run_id: str) -> bool:
    """Whether promoting ``wake`` must first reopen its issue.

    Only a comment wake on a done or cancelled issue, and only when a board user asked
    for more work: one of its comments was written by a user, or it is an
    ``issue_reopened_via_comment`` wake. Never when every comment of the wake came from
    the run that just finished (an agent's own closing words ask for nothing). A wake
    requested by an agent (a mention in an agent's comment) leaves the issue closed."""
    context = rules.as_json(wake["payload"])
    ids = [i for i in (_uuid_or_none(c) for c in rules.comment_ids(context)) if i is not None]
    if not ids:
        return False
    issue_id = str(wake["issue_id"])
    async with db.unit_of_work() as tx:
        status = await foreign_reads.issue_status(tx, issue_id)
        if status not in CLOSED_STATUSES:
            return False
        authors = await foreign_reads.comment_authors(tx, issue_id, ids)
    if authors and all(str(a["created_by_run_id"]) == finishing_run_id for a in authors):
        return False
    explicit = REOPENED_VIA_COMMENT in (wake["reason"], context.get("wakeReason"))
    return explicit or any(a["author_type"] == "user" for a in authors)
