"""Checkout, release and board force-release of an issue.

Checkout is one conditional UPDATE ... RETURNING on the row the terminal-run check
has locked; when it matches nothing, the same locked row tells whether the caller may
adopt an unowned or stale lock, already owns it (idempotent), or lost to a live holder.
On the common path of checkout and release the statement that locks the row also
makes the change (``checkout_statements``); the rules run on the locked row either way.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.actor import Actor
from common.audit import record_activity
from common.authz import (
    require_acting_as,
    require_agent_run,
    require_board,
    require_company_access,
)
from common.db import Database
from common.errors import FailedPrecondition, NotFound, invalid
from common.protoconv import text_or_none
from common.sql import Row, Tx
from common.validation import parse_uuid, require_enum
from issue_service import store
from issue_service.checkout_statements import (
    CHECKOUT_UPDATE,
    lock_and_check_out,
    lock_and_release,
)
from issue_service.events import EventType, emit
from issue_service.locks import clear_if_terminal
from issue_service.model import STATUS_PROTO_VALUES, Status, run_is_stale
from issue_service.ownership import adopt_lock, conflict_metadata, enforce_agent_write
from issue_service.status_rules import LOCK_COLUMNS_CLEARED
from paperclip.issues.v1 import issues_pb2


def _not_found() -> NotFound:
    return NotFound("issue not found", reason="ISSUE_NOT_FOUND")


def _check_assignable(row: Row, agent_id: str, info: store.AgentInfo | None) -> str:
    if info is None:
        raise NotFound("agent not found", reason="AGENT_NOT_FOUND", metadata={"agent_id": agent_id})
    if info.company_id != str(row["company_id"]):
        raise invalid("agent_id", "the agent must belong to the issue's company")
    if info.status == "terminated":
        raise FailedPrecondition(
            "cannot assign work to a terminated agent",
            reason="AGENT_NOT_INVOKABLE",
            metadata={"agent_id": agent_id, "agent_status": info.status},
        )
    return info.name_key


def _refuse_if_blocked(issue_id: str, blockers: Sequence[str]) -> None:
    if blockers:
        raise FailedPrecondition(
            "issue is blocked by unresolved blockers",
            reason="ISSUE_BLOCKED",
            metadata={"issue_id": issue_id, "unresolved_blocker_issue_ids": ",".join(blockers)},
        )


async def open_blocker_ids(tx: Tx, issue_id: str) -> list[str]:
    """The unresolved blockers of an issue."""
    return await store.open_blockers(tx, issue_id)


async def _conflict(tx: Tx, row: Row, expected: Sequence[str]) -> FailedPrecondition:
    holder = text_or_none(row["checkout_run_id"]) or text_or_none(row["execution_run_id"])
    holder_live = holder is not None and not run_is_stale(await store.run_status(tx, holder))
    wrong_status = row["status"] not in expected
    return FailedPrecondition(
        "issue checkout conflict",
        reason="ISSUE_CHECKOUT_CONFLICT",
        metadata=conflict_metadata(
            row,
            holder_run_id=holder or "",
            holder_live="true" if holder_live else "false",
            conflict="status" if wrong_status else ("live_holder" if holder_live else "assignee"),
            retryable="false",
        ),
    )


def _owned_by(row: Row, agent_id: str, run_id: str) -> bool:
    """Whether ``run_id`` of ``agent_id`` already holds the in_progress issue."""
    return (
        row["status"] == Status.IN_PROGRESS
        and text_or_none(row["assignee_agent_id"]) == agent_id
        and text_or_none(row["checkout_run_id"]) == run_id
        and text_or_none(row["execution_run_id"]) in (None, run_id)
    )


async def _adopt_or_conflict(
    tx: Tx,
    actor: Actor,
    row: Row,
    *,
    agent_id: str,
    run_id: str | None,
    expected: Sequence[str],
) -> tuple[Row, bool]:
    """(row, changed) after adoption or idempotent success; raises the conflict."""
    mine = text_or_none(row["assignee_agent_id"]) == agent_id
    checkout = text_or_none(row["checkout_run_id"])
    execution = text_or_none(row["execution_run_id"])
    if run_id is not None and mine and row["status"] == Status.IN_PROGRESS:
        if checkout == run_id and execution in (None, run_id):
            return row, False
        if checkout is None and execution in (None, run_id):
            return await adopt_lock(tx, actor, row, run_id, stale_from=None), True
        if (
            checkout is not None
            and execution in (None, run_id, checkout)
            and run_is_stale(await store.run_status(tx, checkout))
        ):
            return await adopt_lock(tx, actor, row, run_id, stale_from=checkout), True
    if (
        run_id is not None
        and row["status"] in expected
        and (mine or row["assignee_agent_id"] is None)
        and checkout is not None
        and execution in (None, run_id, checkout)
        and run_is_stale(await store.run_status(tx, checkout))
    ):
        # A stale checkout on an issue not in progress: take it like a fresh checkout.
        await store.update_issue_row(tx, str(row["id"]), dict(LOCK_COLUMNS_CLEARED))
        return row, True
    raise await _conflict(tx, row, expected)


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
        row = locked.row
        info = store.agent_of_checkout_row(row, agent)
        blockers = [str(b) for b in row["open_blockers"]]
        require_company_access(actor, str(row["company_id"]), write=True)
        if locked.changed is None:
            row = (await clear_if_terminal(tx, row)).row
        name_key = _check_assignable(row, agent, info)
        _refuse_if_blocked(issue, blockers)
        params = {
            "id": issue,
            "agent": agent,
            "run": run_id,
            "name_key": name_key,
            "expected": expected,
        }
        if run_id is not None and _owned_by(row, agent, run_id):
            # A repeat by the owning run: no new lock time, no second audit row.
            return store.issue_to_proto(row)
        updated = locked.changed
        if updated is None:
            updated = await tx.fetchrow(CHECKOUT_UPDATE, params)
        changed = updated is not None
        if updated is None:
            row, changed = await _adopt_or_conflict(
                tx, actor, row, agent_id=agent, run_id=run_id, expected=expected
            )
            if changed and row["status"] != Status.IN_PROGRESS:
                updated = await tx.fetchrow(CHECKOUT_UPDATE, params)
                if updated is None:
                    raise await _conflict(tx, row, expected)
                row = updated
        else:
            row = updated
        if changed:
            _record_checkout(tx, actor, row, agent_id=agent, run_id=run_id)
        return store.issue_to_proto(row)


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
        if actor.is_agent:
            run_id = require_agent_run(actor)
            if text_or_none(row["assignee_agent_id"]) != actor.agent_id:
                raise FailedPrecondition(
                    "only the assignee can release the issue",
                    reason="ISSUE_OWNERSHIP_CONFLICT",
                    metadata=conflict_metadata(row, actor_agent_id=actor.agent_id or ""),
                )
            checkout = text_or_none(row["checkout_run_id"])
            if (
                row["status"] == Status.IN_PROGRESS
                and checkout not in (None, run_id)
                and not run_is_stale(await store.run_status(tx, checkout or ""))
            ):
                raise FailedPrecondition(
                    "only the checkout run can release the issue",
                    reason="ISSUE_OWNERSHIP_CONFLICT",
                    metadata=conflict_metadata(row, actor_run_id=run_id, holder_live="true"),
                )
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
    "open_blocker_ids",
    "release_issue",
]
