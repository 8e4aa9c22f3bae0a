"""Checkout, release and board force-release of an issue.

Checkout and release first try the fused statement of ``checkout_store``, which
locks the row and, on the common path, makes the change in the same round trip. When
it does not, the slow path clears a terminal execution lock on the locked row, reads
the statuses of the runs still holding it, and applies what ``ownership.decide``
answers: take the issue with the conditional checkout UPDATE, adopt an unowned or stale
lock, repeat idempotently, or refuse. A release asks ``decide`` on the locked row either
way; its refusals roll a fast release back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.actor import Actor
from common.audit import record_activity
from common.authz import (
    require_acting_as,
    require_agent_run,
    require_board,
    require_company_access,
)
from common.db import Database
from common.errors import NotFound, invalid
from common.protoconv import text_or_none
from common.sql import Row, Tx
from common.validation import parse_uuid, require_enum
from issue_service import store
from issue_service.checkout_store import check_out, lock_and_check_out, lock_and_release
from issue_service.events import EventType, emit
from issue_service.locks import clear_if_terminal
from issue_service.model import STATUS_PROTO_VALUES, Status
from issue_service.ownership import (
    Action,
    AgentFacts,
    RunFacts,
    Verdict,
    checkout_conflict,
    decide,
)
from issue_service.ownership_gate import (
    adopt_lock,
    enforce_agent_write,
    holders,
    issue_facts,
    run_facts,
)
from issue_service.status_rules import LOCK_COLUMNS_CLEARED
from paperclip.issues.v1 import issues_pb2


def _not_found() -> NotFound:
    return NotFound("issue not found", reason="ISSUE_NOT_FOUND")


async def checkout_issue(
    db: Database, actor: Actor, *, issue_id: str, agent_id: str, expected_statuses: Sequence[int]
) -> issues_pb2.Issue:
    """Assign the issue to ``agent_id`` in progress, locked by the caller's run."""
    issue = parse_uuid("issue_id", issue_id)
    agent = parse_uuid("agent_id", agent_id)
    assert issue and agent
    expected = _expected_statuses(expected_statuses)
    require_acting_as(actor, agent)
    run_id = require_agent_run(actor) if actor.is_agent else None
    async with db.unit_of_work() as tx:
        locked = await lock_and_check_out(
            tx, issue_id=issue, agent_id=agent, run_id=run_id, expected=expected
        )
        if locked is None:
            raise _not_found()
        require_company_access(actor, str(locked.row["company_id"]), write=True)
        if locked.changed is not None:
            row, changed = locked.changed, True
        else:
            attempt = _Attempt(actor, agent, run_id, expected)
            row, changed = await _check_out_slowly(tx, attempt, locked.row)
        if changed:
            _record_checkout(tx, actor, row, agent_id=agent, run_id=run_id)
        return store.issue_to_proto(row)


@dataclass(frozen=True)
class _Attempt:
    """A checkout request: who asks, for which agent and run, from which statuses."""

    actor: Actor
    agent_id: str
    run_id: str | None
    expected: list[str]


async def _check_out_slowly(tx: Tx, attempt: _Attempt, row: Row) -> tuple[Row, bool]:
    """The checkout the fast path left: the terminal check on the locked row, then what
    ``decide`` answers. (row, changed); raises the refusal."""
    info = store.agent_of_checkout_row(row, attempt.agent_id)
    blockers = [str(b) for b in row["open_blockers"]]
    row = (await clear_if_terminal(tx, row)).row
    facts = issue_facts(row, open_blockers=blockers)
    agent = AgentFacts(
        attempt.agent_id,
        info.company_id if info is not None else None,
        info.status if info is not None else None,
    )
    run = RunFacts(attempt.actor.agent_id, attempt.run_id) if attempt.run_id else None
    locks = await holders(tx, row, Action.CHECK_OUT, run, facts)
    decision = decide(Action.CHECK_OUT, facts, agent, run, locks, expected=attempt.expected)
    if decision.refusal is not None:
        raise decision.refusal.exception()
    if decision.verdict is Verdict.KEEP:
        return row, False
    if decision.verdict is Verdict.TAKE_OVER:
        assert attempt.run_id is not None
        adopted = await adopt_lock(
            tx, attempt.actor, row, attempt.run_id, stale_from=decision.stale_from
        )
        return adopted, True
    if decision.verdict is Verdict.CLEAR_AND_TAKE:
        # A stale checkout of an issue not in progress (an in-progress issue has an
        # assignee, a check of the table: its agent's run got TAKE_OVER): clear, take.
        await store.update_issue_row(tx, facts.id, dict(LOCK_COLUMNS_CLEARED))
    name_key = info.name_key if info is not None else None
    updated = await check_out(
        tx,
        issue_id=facts.id,
        agent_id=attempt.agent_id,
        run_id=attempt.run_id,
        name_key=name_key,
        expected=attempt.expected,
    )
    if updated is None:
        raise checkout_conflict(facts, locks, attempt.expected).exception()
    return updated, True


def _expected_statuses(expected_statuses: Sequence[int]) -> list[str]:
    """The statuses a checkout accepts, by value; at least one."""
    if not expected_statuses:
        raise invalid("expected_statuses", "at least one status is required")
    return [
        Status.from_proto(
            require_enum(f"expected_statuses[{i}]", s, STATUS_PROTO_VALUES) or 0
        ).value
        for i, s in enumerate(expected_statuses)
    ]


def _record_checkout(tx: Tx, actor: Actor, row: Row, *, agent_id: str, run_id: str | None) -> None:
    """The audit row of a checkout, and its event unless the agent checked out itself."""
    company, issue = str(row["company_id"]), str(row["id"])
    record_activity(
        tx,
        actor=actor,
        company_id=company,
        action="issue.checked_out",
        entity_type="issue",
        entity_id=issue,
        details={"agentId": agent_id, "runId": run_id},
    )
    if not (actor.is_agent and actor.agent_id == agent_id):
        emit(
            tx,
            actor=actor,
            company_id=company,
            issue_id=issue,
            type=EventType.CHECKED_OUT,
            target_agent_id=agent_id,
        )


async def _release_row(tx: Tx, row: Row) -> Row:
    """Unassign and unlock a locked issue; back to todo when in progress."""
    values = dict(LOCK_COLUMNS_CLEARED)
    values["assignee_agent_id"] = None
    if row["status"] == Status.IN_PROGRESS:
        values["status"] = Status.TODO.value
    return await store.update_issue_row(tx, str(row["id"]), values)


async def release_issue(db: Database, actor: Actor, *, issue_id: str) -> issues_pb2.Issue:
    """Give the issue up: back to todo (when in progress), unassigned, unlocked."""
    issue = parse_uuid("issue_id", issue_id)
    assert issue
    async with db.unit_of_work() as tx:
        locked = await lock_and_release(
            tx, issue_id=issue, actor_run_id=actor.run_id if actor.is_agent else None
        )
        if locked is None:
            raise _not_found()
        row = locked.row
        if locked.changed is None:
            row = (await clear_if_terminal(tx, row)).row
        require_company_access(actor, str(row["company_id"]), write=True)
        run = run_facts(actor)
        facts = issue_facts(row)
        locks = await holders(tx, row, Action.RELEASE, run, facts)
        decision = decide(Action.RELEASE, facts, None, run, locks)
        if decision.refusal is not None:
            raise decision.refusal.exception()
        updated = locked.changed
        if updated is None:
            updated = await _release_row(tx, row)
        company = str(row["company_id"])
        record_activity(
            tx,
            actor=actor,
            company_id=company,
            action="issue.released",
            entity_type="issue",
            entity_id=issue,
        )
        emit(
            tx,
            actor=actor,
            company_id=company,
            issue_id=issue,
            type=EventType.RELEASED,
            payload={
                "previousAssigneeAgentId": text_or_none(row["assignee_agent_id"]),
                "previousStatus": row["status"],
                "status": updated["status"],
            },
        )
        return store.issue_to_proto(updated)


async def force_release_issue(
    db: Database, actor: Actor, *, issue_id: str, clear_assignee: bool
) -> tuple[issues_pb2.Issue, str | None, str | None]:
    """Board only: clear every lock (and optionally the assignee); the status stays."""
    require_board(actor)
    issue = parse_uuid("issue_id", issue_id)
    assert issue
    async with db.unit_of_work() as tx:
        row = await store.lock_issue(tx, issue)
        if row is None:
            raise _not_found()
        company = str(row["company_id"])
        require_company_access(actor, company, write=True)
        previous_checkout = text_or_none(row["checkout_run_id"])
        previous_execution = text_or_none(row["execution_run_id"])
        values = dict(LOCK_COLUMNS_CLEARED)
        if clear_assignee:
            values["assignee_agent_id"] = None
            if row["status"] == Status.IN_PROGRESS and row["assignee_user_id"] is None:
                # An issue cannot stay in progress without an assignee.
                values["status"] = Status.TODO.value
        updated = await store.update_issue_row(tx, issue, values)
        record_activity(
            tx,
            actor=actor,
            company_id=company,
            action="issue.admin_force_release",
            entity_type="issue",
            entity_id=issue,
            details={
                "issueId": issue,
                "actorUserId": actor.user_id,
                "prevCheckoutRunId": previous_checkout,
                "prevExecutionRunId": previous_execution,
                "clearAssignee": clear_assignee,
            },
        )
        emit(
            tx,
            actor=actor,
            company_id=company,
            issue_id=issue,
            type=EventType.FORCE_RELEASED,
            payload={
                "previousCheckoutRunId": previous_checkout,
                "previousExecutionRunId": previous_execution,
                "clearAssignee": clear_assignee,
            },
        )
        return store.issue_to_proto(updated), previous_checkout, previous_execution


__all__ = [
    "checkout_issue",
    "enforce_agent_write",
    "force_release_issue",
    "release_issue",
]
