"""IssueLockService, the internal compare-and-set lock operations the run service calls.

Every RPC is service-only and safe to repeat: a repeat reports the state without
writing a second audit row. Reference scenario 29 (clearExecutionRunIfTerminal on a
cancelled run clears the checkout it shares) is pinned here.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from common.actor import Role
from paperclip.issues.v1 import issue_locks_pb2
from tests.harness import Clients, Suite, admin, expect_error, service, set_run_status
from tests.issue_service.support import (
    World,
    assert_locks,
    audit,
    comment_count,
    events,
    make_world,
    state,
)


def _locks(w: World) -> Any:
    return w.suite.clients(service()).locks


async def _acquire(
    w: World, issue: str, run: str, agent_id: str, clients: Clients | None = None
) -> Any:
    locks = clients.locks if clients else _locks(w)
    return await locks.AcquireExecutionLock(
        issue_locks_pb2.AcquireExecutionLockRequest(issue_id=issue, run_id=run, agent_id=agent_id)
    )


async def _transfer(w: World, issue: str, source: str, target: str) -> Any:
    return await _locks(w).TransferExecutionLock(
        issue_locks_pb2.TransferExecutionLockRequest(
            issue_id=issue, from_run_id=source, to_run_id=target
        )
    )


async def _release_run(w: World, run: str) -> list[str]:
    out = await _locks(w).ReleaseRunLocks(issue_locks_pb2.ReleaseRunLocksRequest(run_id=run))
    return list(out.issue_ids)


async def _clear(w: World, issue: str) -> bool:
    out = await _locks(w).ClearExecutionRunIfTerminal(
        issue_locks_pb2.ClearExecutionRunIfTerminalRequest(issue_id=issue)
    )
    return bool(out.cleared)


async def _escalate(w: World, issue: str, body: str, key: str = "") -> Any:
    return await _locks(w).EscalateStrandedIssue(
        issue_locks_pb2.EscalateStrandedIssueRequest(issue_id=issue, body=body, idempotency_key=key)
    )


# ------------------------------------------------------------ AcquireExecutionLock


async def test_acquire_free_lock_stamps_run_agent_and_time(suite: Suite) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status="todo", assignee=w.a)

    out = await _acquire(w, issue, cur, w.a)

    assert out.issue.execution_run_id == cur and not out.adopted_from_run_id
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("todo", w.a)
    assert (row["checkout_run_id"], row["execution_run_id"]) == (None, cur)
    assert row["execution_locked_at"] is not None
    assert row["execution_agent_name_key"] == w.names[w.a]
    [entry] = await audit(w.db, issue, "issue.execution_lock_acquired")
    assert (entry["actor_type"], entry["actor_id"]) == ("service", "run_service")
    assert entry["details"] == {"runId": cur, "agentId": w.a, "adoptedFromRunId": None}


async def test_acquire_own_lock_again_changes_nothing(suite: Suite) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status="todo", assignee=w.a)
    await _acquire(w, issue, cur, w.a)
    first = await state(w.db, issue)

    out = await _acquire(w, issue, cur, w.a)

    assert out.issue.execution_run_id == cur and not out.adopted_from_run_id
    assert await state(w.db, issue) == first
    assert len(await audit(w.db, issue, "issue.execution_lock_acquired")) == 1


@pytest.mark.parametrize(
    "holder_status", ["succeeded", "failed", "cancelled", "timed_out", "missing"]
)
async def test_acquire_takes_over_lock_of_terminal_or_missing_run(
    suite: Suite, holder_status: str
) -> None:
    w = await make_world(suite)
    old = str(uuid.uuid4()) if holder_status == "missing" else await w.run(w.a, holder_status)
    cur = await w.run(w.a)
    issue = await w.issue(status="todo", assignee=w.a, execution=old)

    out = await _acquire(w, issue, cur, w.a)

    assert out.adopted_from_run_id == old
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("todo", w.a)
    assert (row["checkout_run_id"], row["execution_run_id"]) == (None, cur)
    assert row["execution_locked_at"] is not None
    assert row["execution_agent_name_key"] == w.names[w.a]
    [entry] = await audit(w.db, issue, "issue.execution_lock_acquired")
    assert entry["details"]["adoptedFromRunId"] == old


@pytest.mark.parametrize("holder_status", ["running", "queued"])
async def test_acquire_refuses_while_a_live_run_holds_the_lock(
    suite: Suite, holder_status: str
) -> None:
    w = await make_world(suite)
    holder = await w.run(w.b, holder_status)
    cur = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.b, checkout=holder, execution=holder)
    before = await state(w.db, issue)

    error = await expect_error(_acquire(w, issue, cur, w.a))

    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ISSUE_EXECUTION_LOCKED",
    )
    assert (error.metadata["holder_run_id"], error.metadata["holder_live"]) == (holder, "true")
    assert await state(w.db, issue) == before
    assert await audit(w.db, issue, "issue.execution_lock_acquired") == []


@pytest.mark.parametrize("run_status", ["failed", "succeeded", "cancelled", "timed_out"])
async def test_acquire_refuses_a_terminal_run(suite: Suite, run_status: str) -> None:
    w = await make_world(suite)
    stale_holder = await w.run(w.a, "failed")
    finished = await w.run(w.a, run_status)
    issue = await w.issue(status="todo", assignee=w.a, execution=stale_holder)
    before = await state(w.db, issue)

    error = await expect_error(_acquire(w, issue, finished, w.a))

    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RUN_NOT_LIVE")
    assert error.metadata["run_status"] == run_status
    # Not even the stale holder's lock is cleared: the whole call is refused.
    assert await state(w.db, issue) == before
    assert await audit(w.db, issue, "issue.execution_lock_acquired") == []


async def test_acquire_refuses_unknown_run_and_issue(suite: Suite) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status="todo", assignee=w.a)

    no_run = await expect_error(_acquire(w, issue, str(uuid.uuid4()), w.a))
    no_issue = await expect_error(_acquire(w, str(uuid.uuid4()), cur, w.a))

    assert (no_run.code, no_run.reason) == (grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND")
    assert (no_issue.code, no_issue.reason) == (grpc.StatusCode.NOT_FOUND, "ISSUE_NOT_FOUND")
    assert_locks(await state(w.db, issue), None)


# ----------------------------------------------------------- TransferExecutionLock


async def test_transfer_moves_both_locks_while_held_and_repeat_is_a_no_op(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    source = await w.run(w.a)
    target = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=source, execution=source)
    before = await state(w.db, issue)

    out = await _transfer(w, issue, source, target)

    assert out.issue.checkout_run_id == target == out.issue.execution_run_id
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("in_progress", w.a)
    assert_locks(row, target)
    assert row["execution_locked_at"] == before["execution_locked_at"]
    [entry] = await audit(w.db, issue, "issue.execution_lock_transferred")
    assert entry["details"] == {"fromRunId": source, "toRunId": target}

    again = await _transfer(w, issue, source, target)

    assert again.issue.execution_run_id == target
    assert await state(w.db, issue) == row
    assert len(await audit(w.db, issue, "issue.execution_lock_transferred")) == 1


async def test_transfer_of_a_checkout_only_lock_is_idempotent(suite: Suite) -> None:
    w = await make_world(suite)
    source = await w.run(w.a)
    target = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=source)

    await _transfer(w, issue, source, target)
    row = await state(w.db, issue)
    assert (row["checkout_run_id"], row["execution_run_id"]) == (target, None)
    await _transfer(w, issue, source, target)

    assert await state(w.db, issue) == row
    assert len(await audit(w.db, issue, "issue.execution_lock_transferred")) == 1


async def test_transfer_refused_once_the_source_no_longer_holds(suite: Suite) -> None:
    w = await make_world(suite)
    source = await w.run(w.a)
    holder = await w.run(w.a)
    target = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=holder, execution=holder)
    unlocked = await w.issue(status="todo", assignee=w.a)
    before = await state(w.db, issue)

    for target_issue in (issue, unlocked):
        error = await expect_error(_transfer(w, target_issue, source, target))
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "ISSUE_LOCK_NOT_HELD",
        )
    assert await state(w.db, issue) == before
    assert_locks(await state(w.db, unlocked), None)
    assert await audit(w.db, issue, "issue.execution_lock_transferred") == []


# ------------------------------------------------------------------ ReleaseRunLocks


async def test_release_run_locks_refuses_a_live_run(suite: Suite) -> None:
    w = await make_world(suite)
    live = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=live, execution=live)
    before = await state(w.db, issue)

    for status in ("running", "queued"):
        await set_run_status(w.db, live, status)
        error = await expect_error(_release_run(w, live))
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "RUN_NOT_TERMINAL",
        )
        assert error.metadata["run_status"] == status

    assert await state(w.db, issue) == before
    assert await audit(w.db, issue, "issue.run_locks_released") == []


async def test_release_run_locks_clears_only_that_runs_locks_and_repeats_empty(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    run = await w.run(w.a)
    other = await w.run(w.b)
    both = await w.issue(status="in_progress", assignee=w.a, checkout=run, execution=run)
    checkout_only = await w.issue(status="in_progress", assignee=w.a, checkout=run)
    mixed = await w.issue(status="in_progress", assignee=w.b, checkout=other, execution=run)
    untouched = await w.issue(status="in_progress", assignee=w.b, checkout=other, execution=other)
    untouched_before = await state(w.db, untouched)
    await set_run_status(w.db, run, "failed")

    released = await _release_run(w, run)

    assert sorted(released) == sorted([both, checkout_only, mixed])
    for issue, assignee in ((both, w.a), (checkout_only, w.a)):
        row = await state(w.db, issue)
        # The status and assignee stay: the assignee's next run adopts the issue.
        assert (row["status"], row["assignee_agent_id"]) == ("in_progress", assignee)
        assert_locks(row, None)
    mixed_row = await state(w.db, mixed)
    assert (mixed_row["checkout_run_id"], mixed_row["execution_run_id"]) == (other, None)
    assert mixed_row["execution_locked_at"] is None
    assert mixed_row["execution_agent_name_key"] is None
    assert await state(w.db, untouched) == untouched_before
    [entry] = await audit(w.db, both, "issue.run_locks_released")
    assert entry["details"] == {"runId": run, "runStatus": "failed"}
    assert await audit(w.db, untouched, "issue.run_locks_released") == []

    assert await _release_run(w, run) == []
    assert len(await audit(w.db, both, "issue.run_locks_released")) == 1


async def test_release_run_locks_of_a_missing_run(suite: Suite) -> None:
    w = await make_world(suite)
    gone = str(uuid.uuid4())
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=gone, execution=gone)

    assert await _release_run(w, gone) == [issue]

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("in_progress", w.a)
    assert_locks(row, None)


# ------------------------------------------------------- ClearExecutionRunIfTerminal


async def test_clear_execution_run_keeps_a_live_run(suite: Suite) -> None:
    w = await make_world(suite)
    live = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=live, execution=live)
    before = await state(w.db, issue)

    assert await _clear(w, issue) is False
    assert await state(w.db, issue) == before


async def test_s29_clear_execution_run_of_cancelled_run_clears_shared_checkout(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    cancelled = await w.run(w.a, "cancelled")
    issue = await w.issue(
        status="in_progress", assignee=w.a, checkout=cancelled, execution=cancelled
    )

    assert await _clear(w, issue) is True

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("in_progress", w.a)
    assert_locks(row, None)
    assert await _clear(w, issue) is False
    assert await state(w.db, issue) == row


async def test_clear_execution_run_keeps_a_checkout_held_by_another_run(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    live = await w.run(w.a)
    failed = await w.run(w.a, "failed")
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=live, execution=failed)

    assert await _clear(w, issue) is True

    row = await state(w.db, issue)
    assert (row["checkout_run_id"], row["execution_run_id"]) == (live, None)
    assert row["execution_locked_at"] is None and row["execution_agent_name_key"] is None


async def test_clear_execution_run_of_missing_run_and_unknown_issue(suite: Suite) -> None:
    w = await make_world(suite)
    gone = str(uuid.uuid4())
    issue = await w.issue(status="todo", assignee=w.a, execution=gone)

    assert await _clear(w, issue) is True
    assert_locks(await state(w.db, issue), None)
    error = await expect_error(_clear(w, str(uuid.uuid4())))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "ISSUE_NOT_FOUND")


# ------------------------------------------------------------ EscalateStrandedIssue


async def test_escalate_blocks_issue_with_one_system_comment_on_repeat(suite: Suite) -> None:
    w = await make_world(suite)
    failed = await w.run(w.a, "failed")
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=failed, execution=failed)
    body = "The run died three times; needs a human."

    first = await _escalate(w, issue, body)

    assert first.escalated is True
    assert (first.comment.author_type, first.comment.body) == ("system", body)
    assert not first.comment.author_agent_id and not first.comment.created_by_run_id
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("blocked", w.a)
    assert_locks(row, None)
    [updated] = await audit(w.db, issue, "issue.updated")
    assert (updated["actor_type"], updated["actor_id"]) == ("system", "system")
    assert (updated["details"]["status"], updated["details"]["source"]) == (
        "blocked",
        "stranded_issue",
    )
    assert updated["details"]["_previous"] == {"status": "in_progress"}
    [wake] = await events(w.db, issue, "issue.status_changed")
    assert wake["target_agent_id"] == w.a

    again = await _escalate(w, issue, body)

    assert again.escalated is False and not again.HasField("comment")
    assert await state(w.db, issue) == row
    assert await comment_count(w.db, issue) == 1
    assert len(await audit(w.db, issue, "issue.updated")) == 1
    assert len(await audit(w.db, issue, "issue.comment_added")) == 1


async def test_escalate_key_makes_a_repeat_with_other_text_a_no_op(suite: Suite) -> None:
    w = await make_world(suite)
    issue = await w.issue(status="todo", assignee=w.a)

    first = await _escalate(w, issue, "stranded", key="sweep-1")
    second = await _escalate(w, issue, "stranded (reworded)", key="sweep-1")
    third = await _escalate(w, issue, "stranded again", key="sweep-2")

    assert (first.escalated, second.escalated, third.escalated) == (True, False, True)
    assert (await state(w.db, issue))["status"] == "blocked"
    assert await comment_count(w.db, issue) == 2
    # Already blocked the third time: a comment, no second status change.
    assert len(await audit(w.db, issue, "issue.updated")) == 1


# -------------------------------------------------------------- service-only calls

_RPCS: dict[str, Callable[[Clients, str, str, str], Awaitable[Any]]] = {
    "AcquireExecutionLock": lambda c, issue, run, agent_id: c.locks.AcquireExecutionLock(
        issue_locks_pb2.AcquireExecutionLockRequest(issue_id=issue, run_id=run, agent_id=agent_id)
    ),
    "TransferExecutionLock": lambda c, issue, run, agent_id: c.locks.TransferExecutionLock(
        issue_locks_pb2.TransferExecutionLockRequest(
            issue_id=issue, from_run_id=run, to_run_id=str(uuid.uuid4())
        )
    ),
    "ReleaseRunLocks": lambda c, issue, run, agent_id: c.locks.ReleaseRunLocks(
        issue_locks_pb2.ReleaseRunLocksRequest(run_id=run)
    ),
    "ClearExecutionRunIfTerminal": lambda c, issue, run, agent_id: (
        c.locks.ClearExecutionRunIfTerminal(
            issue_locks_pb2.ClearExecutionRunIfTerminalRequest(issue_id=issue)
        )
    ),
    "EscalateStrandedIssue": lambda c, issue, run, agent_id: c.locks.EscalateStrandedIssue(
        issue_locks_pb2.EscalateStrandedIssueRequest(issue_id=issue, body="stranded")
    ),
}


@pytest.mark.parametrize("rpc", sorted(_RPCS))
async def test_every_lock_rpc_refuses_non_service_callers(suite: Suite, rpc: str) -> None:
    w = await make_world(suite)
    failed = await w.run(w.a, "failed")
    cur = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=failed, execution=failed)
    before = await state(w.db, issue)
    callers = [
        suite.clients(admin()),
        w.as_board(Role.ADMIN),
        w.as_agent(w.a, cur),
        w.as_agent(w.a, failed),
    ]

    for caller in callers:
        error = await expect_error(_RPCS[rpc](caller, issue, failed, w.a))
        assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "SERVICE_REQUIRED")

    assert await state(w.db, issue) == before
    assert await comment_count(w.db, issue) == 0
    assert [e["action"] for e in await audit(w.db, issue)] == ["issue.created"]
