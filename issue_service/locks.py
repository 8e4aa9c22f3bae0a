"""Execution locks: the terminal-run check every lock decision starts with, and the
internal compare-and-set operations other services call (IssueLockService).

Lock order is always the issue row first, then the run row. Every operation here is
safe to repeat: it states its precondition and succeeds again if already applied.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.actor import Actor
from common.audit import record_activity
from common.authz import require_service
from common.db import Database
from common.errors import FailedPrecondition, NotFound
from common.protoconv import text_or_none
from common.sql import Row, Tx
from common.validation import parse_uuid
from issue_service import foreign_reads, lock_store, store
from issue_service.model import TERMINAL_RUN_STATUSES, run_is_stale
from issue_service.status_rules import LOCK_COLUMNS_CLEARED
from paperclip.issues.v1 import issues_pb2


@dataclass(frozen=True)
class LockedIssue:
    """An issue row locked for the rest of the transaction, after the terminal check."""

    row: Row
    cleared_run_id: str | None


async def lock_and_clear_terminal(
    tx: Tx, issue_id: str, *, clear_checkout: bool = False
) -> LockedIssue | None:
    """Lock the issue, then its execution run; clear the execution lock when that run
    is terminal or missing (compare-and-set on the value read). None: no such issue.

    ``clear_checkout`` also clears the checkout when the same run holds it. The gates
    leave it, so that the assignee's next run adopts it with an audited takeover."""
    row = await store.lock_issue(tx, issue_id)
    if row is None:
        return None
    return await clear_if_terminal(tx, row, clear_checkout=clear_checkout)


async def clear_if_terminal(tx: Tx, row: Row, *, clear_checkout: bool = False) -> LockedIssue:
    """The terminal check of ``lock_and_clear_terminal`` on an issue row already locked
    (read with ``execution_run_status``).

    A run seen live needs no lock: terminal is final, so if the run ends right after
    this read, its ReleaseRunLocks queues on the issue row and clears the lock once
    this transaction commits. Only a clear decision locks the run row, issue first."""
    issue_id = row["id"]
    run_id = row["execution_run_id"]
    if run_id is None or not run_is_stale(row["execution_run_status"]):
        return LockedIssue(row, None)
    status = await foreign_reads.run_status(tx, str(run_id), lock=True)
    if not run_is_stale(status):
        return LockedIssue(row, None)
    updated = await lock_store.clear_execution(
        tx, str(issue_id), str(run_id), with_checkout=clear_checkout
    )
    if updated is None:
        return LockedIssue(row, None)
    return LockedIssue(updated, str(run_id))


async def clear_execution_run_if_terminal(db: Database, actor: Actor, *, issue_id: str) -> bool:
    """IssueLockService.ClearExecutionRunIfTerminal: whether a stale lock was cleared
    (with the checkout, when the same terminal run holds it)."""
    require_service(actor)
    issue = parse_uuid("issue_id", issue_id)
    assert issue is not None
    async with db.unit_of_work() as tx:
        locked = await lock_and_clear_terminal(tx, issue, clear_checkout=True)
        if locked is None:
            raise NotFound("issue not found", reason="ISSUE_NOT_FOUND")
        return locked.cleared_run_id is not None


def _issue_missing() -> NotFound:
    return NotFound("issue not found", reason="ISSUE_NOT_FOUND")


async def acquire_execution_lock(
    db: Database, actor: Actor, *, issue_id: str, run_id: str, agent_id: str
) -> tuple[issues_pb2.Issue, str | None]:
    """Take the execution lock for a live run: free, own, or held by a stale run."""
    require_service(actor)
    issue = parse_uuid("issue_id", issue_id)
    run = parse_uuid("run_id", run_id)
    agent = parse_uuid("agent_id", agent_id)
    assert issue and run and agent
    async with db.unit_of_work() as tx:
        locked = await lock_and_clear_terminal(tx, issue)
        if locked is None:
            raise _issue_missing()
        status = await foreign_reads.run_status(tx, run, lock=True)
        if status is None:
            raise NotFound("run not found", reason="RUN_NOT_FOUND", metadata={"run_id": run})
        if status in TERMINAL_RUN_STATUSES:
            raise FailedPrecondition(
                "a finished run cannot take a lock",
                reason="RUN_NOT_LIVE",
                metadata={"run_id": run, "run_status": status},
            )
        row = locked.row
        holder = row["execution_run_id"]
        if holder is not None and str(holder) != run:
            raise FailedPrecondition(
                "issue is locked by another live run",
                reason="ISSUE_EXECUTION_LOCKED",
                metadata={"issue_id": issue, "holder_run_id": str(holder), "holder_live": "true"},
            )
        if holder is not None:
            return store.issue_to_proto(row), locked.cleared_run_id
        info = await foreign_reads.agent_info(tx, agent)
        if info is None or info.company_id != str(row["company_id"]):
            raise NotFound("agent not found", reason="AGENT_NOT_FOUND")
        new_row = await lock_store.take_execution(tx, issue, run, info.name_key)
        assert new_row is not None
        record_activity(
            tx,
            actor=actor,
            company_id=str(row["company_id"]),
            action="issue.execution_lock_acquired",
            entity_type="issue",
            entity_id=issue,
            details={"runId": run, "agentId": agent, "adoptedFromRunId": locked.cleared_run_id},
        )
        return store.issue_to_proto(new_row), locked.cleared_run_id


async def transfer_execution_lock(
    db: Database, actor: Actor, *, issue_id: str, from_run_id: str, to_run_id: str
) -> issues_pb2.Issue:
    """Move the locks from ``from_run_id`` to ``to_run_id`` only while ``from`` holds them."""
    require_service(actor)
    issue = parse_uuid("issue_id", issue_id)
    source = parse_uuid("from_run_id", from_run_id)
    target = parse_uuid("to_run_id", to_run_id)
    assert issue and source and target
    async with db.unit_of_work() as tx:
        row = await store.lock_issue(tx, issue)
        if row is None:
            raise _issue_missing()
        execution = text_or_none(row["execution_run_id"])
        checkout = text_or_none(row["checkout_run_id"])
        if source not in (execution, checkout):
            if target in (execution, checkout):
                return store.issue_to_proto(row)  # a repeat of a transfer already made
            raise FailedPrecondition(
                "the run no longer holds the issue's lock",
                reason="ISSUE_LOCK_NOT_HELD",
                metadata={
                    "issue_id": issue,
                    "from_run_id": source,
                    "execution_run_id": execution or "",
                    "checkout_run_id": checkout or "",
                },
            )
        values: dict[str, object] = {}
        if execution == source:
            values["execution_run_id"] = target
            values["execution_locked_at"] = row["execution_locked_at"]
        if checkout == source:
            values["checkout_run_id"] = target
        new_row = await store.update_issue_row(tx, issue, values)
        record_activity(
            tx,
            actor=actor,
            company_id=str(row["company_id"]),
            action="issue.execution_lock_transferred",
            entity_type="issue",
            entity_id=issue,
            details={"fromRunId": source, "toRunId": target},
        )
        return store.issue_to_proto(new_row)


async def release_run_locks(db: Database, actor: Actor, *, run_id: str) -> list[str]:
    """Clear every lock a terminal (or missing) run holds; the issues it touched."""
    require_service(actor)
    run = parse_uuid("run_id", run_id)
    assert run
    async with db.unit_of_work() as tx:
        rows = await lock_store.lock_issues_held_by(tx, run)
        status = await foreign_reads.run_status(tx, run, lock=True)
        if not run_is_stale(status):
            raise FailedPrecondition(
                "the run is still live",
                reason="RUN_NOT_TERMINAL",
                metadata={"run_id": run, "run_status": status or ""},
            )
        for row in rows:
            values: dict[str, object] = {}
            if text_or_none(row["execution_run_id"]) == run:
                values.update(
                    {k: v for k, v in LOCK_COLUMNS_CLEARED.items() if k != "checkout_run_id"}
                )
            if text_or_none(row["checkout_run_id"]) == run:
                values["checkout_run_id"] = None
            await store.update_issue_row(tx, str(row["id"]), values)
            record_activity(
                tx,
                actor=actor,
                company_id=str(row["company_id"]),
                action="issue.run_locks_released",
                entity_type="issue",
                entity_id=str(row["id"]),
                details={"runId": run, "runStatus": status},
            )
        return [str(row["id"]) for row in rows]
