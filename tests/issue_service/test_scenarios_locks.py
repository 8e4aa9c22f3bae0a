"""Reference scenarios 1-29 (docs: paperclip-issue-service.md §8): checkout, release,
force-release, the ownership gate and stale-lock adoption, over the real servers.

Each test seeds the issue row directly (status, assignee, checkout and execution run)
with runs as ``runs.heartbeat_runs`` rows, calls the public API as the scenario's actor,
then checks the row itself and the audit (``audit.activity_log``) and outbox
(``issues.issue_events``) rows.

Scenarios that do not fit our API and are deliberately not tested here:

- 6, 7, 8 and 10 (TTL-stale running owners, ``{force:true}`` release,
  ``monitorNextCheckAt``): a running run is live for as long as it is ``running``; the
  run service's lease and idle timeout finalize a silent run, which releases its locks
  (user-asks 1, 4). There is no age-based takeover and no ``force`` flag.
- 14, 15 and 16 (``POST /issues/:id/reconcile-lock``): no such RPC. Terminal locks are
  cleared by every gate (``clearExecutionRunIfTerminal``) and by the internal
  ``ReleaseRunLocks`` / ``ClearExecutionRunIfTerminal`` (see test_lock_service.py).
- 24, second half (a CEO override releases another agent's issue): there is no
  ``tasks:manage_active_checkouts`` override; the board uses ForceReleaseIssue.
- 29 (clearExecutionRunIfTerminal on a cancelled run) is an IssueLockService test in
  test_lock_service.py.

Where our design deliberately differs from the reference the test says so: conflicts are
FAILED_PRECONDITION with machine-readable metadata (user-asks 3), and checkout stamps
``execution_locked_at`` and the execution agent name key for the new run.
"""

from __future__ import annotations

import uuid

import grpc
import pytest

from common.actor import Actor, ActorType, Role
from paperclip.issues.v1 import issues_pb2
from tests.harness import Suite, expect_error
from tests.issue_service.support import (
    assert_locks,
    audit,
    checkout,
    comment,
    events,
    force_release,
    make_world,
    pb_status,
    release,
    state,
    update,
)

# ------------------------------------------------------------------ scenarios 1-13


async def test_s01_patch_by_assignee_adopts_lock_of_failed_execution_run(suite: Suite) -> None:
    w = await make_world(suite)
    failed = await w.run(w.a, "failed")
    cur = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, execution=failed)

    out = await update(w.as_agent(w.a, cur), issue, title="Renamed")

    assert out.title == "Renamed"
    assert out.checkout_run_id == cur == out.execution_run_id
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"], row["title"]) == (
        "in_progress",
        w.a,
        "Renamed",
    )
    assert_locks(row, cur)
    assert row["execution_agent_name_key"] == w.names[w.a]
    # The checkout was empty: an unowned adoption, not a stale takeover.
    assert await audit(w.db, issue, "issue.checkout_lock_adopted") == []
    [updated] = await audit(w.db, issue, "issue.updated")
    assert (updated["actor_type"], updated["agent_id"], updated["run_id"]) == ("agent", w.a, cur)
    assert updated["details"]["title"] == "Renamed"
    assert updated["details"]["_previous"] == {"title": "Work"}


async def test_s02_assignee_releases_issue_locked_by_its_failed_run(suite: Suite) -> None:
    w = await make_world(suite)
    failed = await w.run(w.a, "failed")
    cur = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=failed, execution=failed)

    out = await release(w.as_agent(w.a, cur), issue)

    assert out.status == issues_pb2.ISSUE_STATUS_TODO and not out.assignee_agent_id
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("todo", None)
    assert_locks(row, None)
    [released] = await audit(w.db, issue, "issue.released")
    assert (released["actor_type"], released["agent_id"], released["run_id"]) == ("agent", w.a, cur)
    assert released["details"] == {}
    [event] = await events(w.db, issue, "issue.released")
    assert event["payload"]["previousAssigneeAgentId"] == w.a


async def test_s03_force_release_refuses_agents_and_outsiders(suite: Suite) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    failed = await w.run(w.a, "failed")
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=cur, execution=failed)
    before = await state(w.db, issue)

    by_agent = await expect_error(force_release(w.as_agent(w.a, cur), issue, clear_assignee=True))
    assert (by_agent.code, by_agent.reason) == (grpc.StatusCode.PERMISSION_DENIED, "BOARD_REQUIRED")
    outsider = suite.clients(Actor(type=ActorType.BOARD, user_id="outsider"))
    no_company = await expect_error(force_release(outsider, issue, clear_assignee=True))
    assert (no_company.code, no_company.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "COMPANY_ACCESS_DENIED",
    )
    viewer = await expect_error(force_release(w.as_board(Role.VIEWER), issue))
    assert (viewer.code, viewer.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "COMPANY_ACCESS_DENIED",
    )

    assert await state(w.db, issue) == before
    assert await audit(w.db, issue, "issue.admin_force_release") == []
    assert await events(w.db, issue, "issue.force_released") == []


async def test_s03_board_force_release_with_clear_assignee_audits_previous_locks(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    failed = await w.run(w.a, "failed")
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=cur, execution=failed)

    out = await force_release(w.as_board(Role.ADMIN), issue, clear_assignee=True)

    assert (out.previous_checkout_run_id, out.previous_execution_run_id) == (cur, failed)
    assert not out.issue.assignee_agent_id
    assert not out.issue.checkout_run_id and not out.issue.execution_run_id
    assert not out.issue.HasField("execution_locked_at")
    row = await state(w.db, issue)
    # Design: an issue cannot stay in_progress without an assignee (§2), so clearing
    # the assignee of an in_progress issue puts it back to todo.
    assert (row["status"], row["assignee_agent_id"]) == ("todo", None)
    assert_locks(row, None)
    [entry] = await audit(w.db, issue, "issue.admin_force_release")
    assert (entry["actor_type"], entry["actor_id"]) == ("user", "board-user")
    assert entry["details"] == {
        "issueId": issue,
        "actorUserId": "board-user",
        "prevCheckoutRunId": cur,
        "prevExecutionRunId": failed,
        "clearAssignee": True,
    }
    [event] = await events(w.db, issue, "issue.force_released")
    assert event["payload"] == {
        "previousCheckoutRunId": cur,
        "previousExecutionRunId": failed,
        "clearAssignee": True,
    }


async def test_s04_force_release_of_live_holder_asks_run_service_to_cancel_it(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=cur, execution=cur)

    out = await force_release(w.as_board(), issue)

    assert (out.previous_checkout_run_id, out.previous_execution_run_id) == (cur, cur)
    row = await state(w.db, issue)
    # Without clear_assignee the status and the assignee stay.
    assert (row["status"], row["assignee_agent_id"]) == ("in_progress", w.a)
    assert_locks(row, None)
    [entry] = await audit(w.db, issue, "issue.admin_force_release")
    assert entry["details"]["clearAssignee"] is False
    # The holder is cancelled by the run service, which consumes this outbox row.
    [event] = await events(w.db, issue, "issue.force_released")
    assert event["payload"]["previousExecutionRunId"] == cur
    assert (event["actor_type"], event["actor_id"]) == ("user", "board-user")


@pytest.mark.parametrize("status", ["done", "cancelled", "in_review", "blocked"])
async def test_s05_release_keeps_a_status_other_than_in_progress(suite: Suite, status: str) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status=status, assignee=w.a, checkout=cur, execution=cur)

    out = await release(w.as_agent(w.a, cur), issue)

    assert out.status == pb_status(status)
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == (status, None)
    assert_locks(row, None)
    assert len(await audit(w.db, issue, "issue.released")) == 1


async def test_s09_patch_adopts_checkout_of_timed_out_run_and_audits_takeover(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    timed_out = await w.run(w.a, "timed_out")
    cur = await w.run(w.a)
    issue = await w.issue(
        status="in_progress", assignee=w.a, checkout=timed_out, execution=timed_out
    )

    out = await update(w.as_agent(w.a, cur), issue, description="progress")

    assert out.checkout_run_id == cur == out.execution_run_id
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("in_progress", w.a)
    assert_locks(row, cur)
    assert row["execution_agent_name_key"] == w.names[w.a]
    [adopted] = await audit(w.db, issue, "issue.checkout_lock_adopted")
    assert adopted["details"] == {
        "previousCheckoutRunId": timed_out,
        "checkoutRunId": cur,
        "reason": "stale_checkout_run",
    }
    assert adopted["run_id"] == cur


async def test_s09_missing_checkout_run_counts_as_stale(suite: Suite) -> None:
    w = await make_world(suite)
    gone = str(uuid.uuid4())  # a run row that no longer exists
    cur = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=gone, execution=gone)

    await update(w.as_agent(w.a, cur), issue, description="progress")

    row = await state(w.db, issue)
    assert row["status"] == "in_progress"
    assert_locks(row, cur)
    [adopted] = await audit(w.db, issue, "issue.checkout_lock_adopted")
    assert adopted["details"]["previousCheckoutRunId"] == gone


async def test_s11_patch_under_another_run_than_live_holder_is_ownership_conflict(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    live = await w.run(w.a)
    other = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=live, execution=live)
    before = await state(w.db, issue)

    error = await expect_error(update(w.as_agent(w.a, other), issue, title="Mine now"))

    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ISSUE_OWNERSHIP_CONFLICT",
    )
    assert error.metadata["checkout_run_id"] == live
    assert error.metadata["execution_run_id"] == live
    assert error.metadata["holder_live"] == "true"
    assert error.metadata["actor_run_id"] == other
    assert await state(w.db, issue) == before
    assert await audit(w.db, issue, "issue.updated") == []


async def test_s11_stale_checkout_does_not_hand_over_a_live_execution_run(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    failed = await w.run(w.a, "failed")
    live = await w.run(w.a)
    cur = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=failed, execution=live)
    before = await state(w.db, issue)

    error = await expect_error(update(w.as_agent(w.a, cur), issue, title="Mine now"))

    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ISSUE_OWNERSHIP_CONFLICT",
    )
    assert error.metadata["execution_run_id"] == live
    assert await state(w.db, issue) == before
    assert await audit(w.db, issue, "issue.updated") == []
    assert await audit(w.db, issue, "issue.checkout_lock_adopted") == []


async def test_s11_gate_refuses_writes_to_another_agents_issue(suite: Suite) -> None:
    w = await make_world(suite)
    live = await w.run(w.a)
    cur_b = await w.run(w.b)
    held = await w.issue(status="in_progress", assignee=w.a, checkout=live, execution=live)
    todo = await w.issue(status="todo", assignee=w.a)
    b = w.as_agent(w.b, cur_b)

    in_progress = await expect_error(update(b, held, title="x"))
    assert (in_progress.code, in_progress.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ISSUE_OWNERSHIP_CONFLICT",
    )
    assert in_progress.metadata["assignee_agent_id"] == w.a
    assert in_progress.metadata["actor_agent_id"] == w.b
    not_started = await expect_error(update(b, todo, title="x"))
    assert (not_started.code, not_started.reason) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "AGENT_MISMATCH",
    )
    held_row, todo_row = await state(w.db, held), await state(w.db, todo)
    assert (held_row["title"], held_row["assignee_agent_id"]) == ("Work", w.a)
    assert_locks(held_row, live)
    assert (todo_row["title"], todo_row["status"], todo_row["assignee_agent_id"]) == (
        "Work",
        "todo",
        w.a,
    )
    assert_locks(todo_row, None)


async def test_s12_second_live_run_of_assignee_gets_checkout_conflict(suite: Suite) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    second = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=cur, execution=cur)
    before = await state(w.db, issue)

    error = await expect_error(
        checkout(w.as_agent(w.a, second), issue, w.a, "todo", "backlog", "blocked", "in_review")
    )

    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ISSUE_CHECKOUT_CONFLICT",
    )
    assert {
        k: error.metadata[k]
        for k in (
            "holder_run_id",
            "holder_live",
            "checkout_run_id",
            "execution_run_id",
            "status",
            "assignee_agent_id",
        )
    } == {
        "holder_run_id": cur,
        "holder_live": "true",
        "checkout_run_id": cur,
        "execution_run_id": cur,
        "status": "in_progress",
        "assignee_agent_id": w.a,
    }
    assert await state(w.db, issue) == before
    assert await audit(w.db, issue, "issue.checked_out") == []


async def test_s13_assignee_checks_out_todo_issue_whose_checkout_run_failed(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    failed = await w.run(w.b, "failed")
    cur = await w.run(w.b)
    issue = await w.issue(status="todo", assignee=w.b, checkout=failed)

    out = await checkout(w.as_agent(w.b, cur), issue, w.b, "todo")

    assert out.status == issues_pb2.ISSUE_STATUS_IN_PROGRESS
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("in_progress", w.b)
    assert_locks(row, cur)
    assert row["execution_agent_name_key"] == w.names[w.b]
    [entry] = await audit(w.db, issue, "issue.checked_out")
    assert entry["details"] == {"agentId": w.b, "runId": cur}


# ----------------------------------------------------------------- scenarios 17-28


async def test_s17_other_agent_may_comment_on_issue_held_by_live_run(suite: Suite) -> None:
    w = await make_world(suite)
    live = await w.run(w.a)
    run_m = await w.run(w.c)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=live, execution=live)
    before = await state(w.db, issue)

    made = await comment(w.as_agent(w.c, run_m), issue, "I can help with the tests")

    assert (made.author_type, made.author_agent_id, made.created_by_run_id) == ("agent", w.c, run_m)
    after = await state(w.db, issue)
    assert after == before
    assert_locks(after, live)
    [added] = await audit(w.db, issue, "issue.comment_added")
    assert added["details"]["commentId"] == made.id
    [wake] = await events(w.db, issue, "issue.commented")
    assert (wake["target_agent_id"], wake["actor_run_id"]) == (w.a, run_m)


async def test_s18_owner_moving_locked_issue_to_blocked_clears_all_locks(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=cur, execution=cur)

    await update(w.as_agent(w.a, cur), issue, status=issues_pb2.ISSUE_STATUS_BLOCKED)

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("blocked", w.a)
    assert_locks(row, None)
    [entry] = await audit(w.db, issue, "issue.updated")
    assert entry["details"]["status"] == "blocked"
    assert entry["details"]["_previous"]["status"] == "in_progress"
    assert "boardOverride" not in entry["details"]
    [wake] = await events(w.db, issue, "issue.status_changed")
    assert wake["payload"]["executionRunId"] == cur


async def test_s18_board_moving_locked_issue_to_todo_clears_locks_as_override(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=cur, execution=cur)

    await update(w.as_board(), issue, status=issues_pb2.ISSUE_STATUS_TODO)

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("todo", w.a)
    assert_locks(row, None)
    [entry] = await audit(w.db, issue, "issue.updated")
    assert entry["details"]["boardOverride"] is True
    assert entry["actor_type"] == "user"


async def test_s18_agent_must_follow_documented_transitions(suite: Suite) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=cur, execution=cur)
    todo = await w.issue(status="todo", assignee=w.a)
    me = w.as_agent(w.a, cur)

    back = await expect_error(update(me, issue, status=issues_pb2.ISSUE_STATUS_TODO))
    skip = await expect_error(update(me, todo, status=issues_pb2.ISSUE_STATUS_DONE))

    for error, frm, to in ((back, "in_progress", "todo"), (skip, "todo", "done")):
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "INVALID_STATUS_TRANSITION",
        )
        assert (error.metadata["from"], error.metadata["to"]) == (frm, to)
    row = await state(w.db, issue)
    assert row["status"] == "in_progress"
    assert_locks(row, cur)
    assert (await state(w.db, todo))["status"] == "todo"
    assert await audit(w.db, issue, "issue.updated") == []
    assert await audit(w.db, todo, "issue.updated") == []


async def test_s19_reassigning_locked_issue_keeps_status_and_clears_locks(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=cur, execution=cur)

    await update(w.as_board(), issue, assignee_agent_id=w.b)

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("in_progress", w.b)
    assert_locks(row, None)
    [entry] = await audit(w.db, issue, "issue.updated")
    assert entry["details"]["assignee_agent_id"] == w.b
    assert entry["details"]["_previous"]["assignee_agent_id"] == w.a
    [wake] = await events(w.db, issue, "issue.assigned")
    assert wake["target_agent_id"] == w.b


async def test_s20_assignee_releases_with_its_own_run(suite: Suite) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=cur, execution=cur)
    assert (await state(w.db, issue))["execution_agent_name_key"] == w.names[w.a]

    out = await release(w.as_agent(w.a, cur), issue)

    assert out.status == issues_pb2.ISSUE_STATUS_TODO
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("todo", None)
    assert_locks(row, None)
    assert row["execution_agent_name_key"] is None
    assert len(await audit(w.db, issue, "issue.released")) == 1


async def test_s21_checkout_of_todo_issue_whose_execution_run_succeeded(suite: Suite) -> None:
    w = await make_world(suite)
    old = await w.run(w.b, "succeeded")
    new = await w.run(w.a)
    issue = await w.issue(status="todo", execution=old)

    out = await checkout(w.as_agent(w.a, new), issue, w.a, "todo")

    assert out.status == issues_pb2.ISSUE_STATUS_IN_PROGRESS and out.assignee_agent_id == w.a
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("in_progress", w.a)
    assert_locks(row, new)
    # Design: our checkout stamps the lock time and the holder's name (the reference
    # leaves both null).
    assert row["execution_agent_name_key"] == w.names[w.a]
    assert row["started_at"] is not None
    [entry] = await audit(w.db, issue, "issue.checked_out")
    assert (entry["details"], entry["run_id"]) == ({"agentId": w.a, "runId": new}, new)
    # An agent checking itself out inside its own run is not woken.
    assert await events(w.db, issue, "issue.checked_out") == []


async def test_s22_checkout_conflicts_with_running_execution_run(suite: Suite) -> None:
    w = await make_world(suite)
    running = await w.run(w.b)
    cur = await w.run(w.a)
    issue = await w.issue(status="todo", execution=running)
    before = await state(w.db, issue)

    error = await expect_error(checkout(w.as_agent(w.a, cur), issue, w.a, "todo"))

    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ISSUE_CHECKOUT_CONFLICT",
    )
    assert (error.metadata["holder_run_id"], error.metadata["holder_live"]) == (running, "true")
    assert (error.metadata["checkout_run_id"], error.metadata["execution_run_id"]) == ("", running)
    assert await state(w.db, issue) == before
    assert await audit(w.db, issue, "issue.checked_out") == []


async def test_s23_other_agent_cannot_check_out_assigned_issue_with_stale_execution(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    stale = await w.run(w.b, "failed")
    run_c = await w.run(w.c)
    issue = await w.issue(status="in_progress", assignee=w.b, execution=stale)
    before = await state(w.db, issue)

    error = await expect_error(checkout(w.as_agent(w.c, run_c), issue, w.c, "todo", "in_progress"))

    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ISSUE_CHECKOUT_CONFLICT",
    )
    # The holder is stale but the issue is someone else's: not worth retrying.
    assert error.metadata["holder_live"] == "false"
    assert error.metadata["assignee_agent_id"] == w.b
    # Nothing is written on conflict, not even the terminal-run cleanup.
    assert await state(w.db, issue) == before
    assert await audit(w.db, issue, "issue.checked_out") == []


async def test_s23_agent_cannot_check_out_as_another_agent(suite: Suite) -> None:
    w = await make_world(suite)
    run_c = await w.run(w.c)
    issue = await w.issue(status="todo")

    error = await expect_error(checkout(w.as_agent(w.c, run_c), issue, w.a, "todo"))

    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "AGENT_MISMATCH")
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("todo", None)
    assert_locks(row, None)


async def test_s24_non_assignee_release_is_ownership_conflict(suite: Suite) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    run_b = await w.run(w.b)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=cur, execution=cur)
    before = await state(w.db, issue)

    error = await expect_error(release(w.as_agent(w.b, run_b), issue))

    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ISSUE_OWNERSHIP_CONFLICT",
    )
    assert error.metadata["assignee_agent_id"] == w.a
    assert await state(w.db, issue) == before
    assert await audit(w.db, issue, "issue.released") == []


async def test_s24_assignee_cannot_release_while_another_live_run_holds_checkout(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    live = await w.run(w.a)
    cur = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=live, execution=live)
    before = await state(w.db, issue)

    error = await expect_error(release(w.as_agent(w.a, cur), issue))

    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ISSUE_OWNERSHIP_CONFLICT",
    )
    assert error.metadata["holder_live"] == "true"
    assert await state(w.db, issue) == before
    assert await audit(w.db, issue, "issue.released") == []


async def test_s25_repeated_checkout_by_same_run_is_idempotent(suite: Suite) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status="todo", assignee=w.a)
    me = w.as_agent(w.a, cur)

    first = await checkout(me, issue, w.a, "todo")
    row_first = await state(w.db, issue)
    second = await checkout(me, issue, w.a, "todo", "in_progress")

    assert first.checkout_run_id == second.checkout_run_id == cur
    row = await state(w.db, issue)
    assert row == row_first
    assert (row["status"], row["assignee_agent_id"]) == ("in_progress", w.a)
    assert_locks(row, cur)
    assert len(await audit(w.db, issue, "issue.checked_out")) == 1


async def test_s26_comment_by_new_run_adopts_checkout_of_succeeded_run(suite: Suite) -> None:
    w = await make_world(suite)
    run_old = await w.run(w.a, "succeeded")
    run_new = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=run_old)

    await comment(w.as_agent(w.a, run_new), issue, "picking this back up")

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("in_progress", w.a)
    assert_locks(row, run_new)
    assert row["execution_agent_name_key"] == w.names[w.a]
    [adopted] = await audit(w.db, issue, "issue.checkout_lock_adopted")
    assert adopted["details"]["previousCheckoutRunId"] == run_old
    assert adopted["details"]["checkoutRunId"] == run_new


async def test_s27_checkout_of_assigned_todo_issue_whose_execution_run_failed(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    failed = await w.run(w.a, "failed")
    cur = await w.run(w.a)
    issue = await w.issue(status="todo", assignee=w.a, execution=failed)

    out = await checkout(w.as_agent(w.a, cur), issue, w.a, "todo")

    assert out.checkout_run_id == cur == out.execution_run_id
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("in_progress", w.a)
    assert_locks(row, cur)
    assert len(await audit(w.db, issue, "issue.checked_out")) == 1


async def test_s28_queued_execution_run_is_a_live_holder(suite: Suite) -> None:
    w = await make_world(suite)
    queued = await w.run(w.b, "queued")
    cur = await w.run(w.a)
    issue = await w.issue(status="todo", execution=queued)
    before = await state(w.db, issue)

    error = await expect_error(checkout(w.as_agent(w.a, cur), issue, w.a, "todo"))

    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ISSUE_CHECKOUT_CONFLICT",
    )
    assert (error.metadata["holder_run_id"], error.metadata["holder_live"]) == (queued, "true")
    assert await state(w.db, issue) == before
    assert await audit(w.db, issue, "issue.checked_out") == []


# ------------------------------------------------ §2 rules the scenarios rely on


async def test_ref2_in_progress_requires_an_assignee(suite: Suite) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    unassigned = await w.issue(status="todo")
    held = await w.issue(status="in_progress", assignee=w.a, checkout=cur, execution=cur)

    to_progress = await expect_error(
        update(w.as_board(), unassigned, status=issues_pb2.ISSUE_STATUS_IN_PROGRESS)
    )
    unassign = await expect_error(update(w.as_board(), held, assignee_agent_id=""))
    created = await expect_error(
        w.board.issues.CreateIssue(
            issues_pb2.CreateIssueRequest(
                company_id=w.company_id, title="x", status=issues_pb2.ISSUE_STATUS_IN_PROGRESS
            )
        )
    )

    for error in (to_progress, unassign, created):
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "ISSUE_ASSIGNEE_REQUIRED",
        )
    assert (await state(w.db, unassigned))["status"] == "todo"
    row = await state(w.db, held)
    assert (row["status"], row["assignee_agent_id"]) == ("in_progress", w.a)
    assert_locks(row, cur)


@pytest.mark.parametrize("blocker_status", ["todo", "cancelled"])
async def test_ref2_open_blocker_refuses_checkout_and_in_progress(
    suite: Suite, blocker_status: str
) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    blocker = await w.issue(status=blocker_status)
    issue = await w.issue(status="todo", assignee=w.a, blocked_by=(blocker,))

    by_checkout = await expect_error(checkout(w.as_agent(w.a, cur), issue, w.a, "todo"))
    by_update = await expect_error(
        update(w.as_board(), issue, status=issues_pb2.ISSUE_STATUS_IN_PROGRESS)
    )

    for error in (by_checkout, by_update):
        assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ISSUE_BLOCKED")
        assert error.metadata["unresolved_blocker_issue_ids"] == blocker
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("todo", w.a)
    assert_locks(row, None)
    assert await audit(w.db, issue, "issue.checked_out") == []


async def test_ref2_done_blocker_resolves_and_blockers_can_be_set_by_update(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    blocker = await w.issue(status="done")
    open_blocker = await w.issue(status="in_review")
    issue = await w.issue(status="todo", assignee=w.a, blocked_by=(blocker,))

    out = await checkout(w.as_agent(w.a, cur), issue, w.a, "todo")
    assert out.status == issues_pb2.ISSUE_STATUS_IN_PROGRESS
    assert list(out.blocked_by_issue_ids) == [blocker]

    # The owner blocks its own issue on another one: in_progress -> blocked.
    updated = await update(
        w.as_agent(w.a, cur),
        issue,
        status=issues_pb2.ISSUE_STATUS_BLOCKED,
        blocked_by_issue_ids=[open_blocker],
    )
    assert list(updated.blocked_by_issue_ids) == [open_blocker]
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("blocked", w.a)
    assert_locks(row, None)
    again = await expect_error(checkout(w.as_agent(w.a, cur), issue, w.a, "blocked"))
    assert again.reason == "ISSUE_BLOCKED"
