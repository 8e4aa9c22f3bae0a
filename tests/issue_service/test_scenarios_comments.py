"""Reference scenarios 30-45 (docs: paperclip-issue-service.md §6, §8): comments, the
reopen / resume / interrupt rules and the wakes they cause, over the real servers.

Wakes are rows of the outbox ``issues.issue_events`` (type ``issue.reopened``,
``issue.commented``, ``issue.mentioned``, ...; ``target_agent_id``; ``payload``); the run
service turns them into runs. The reference's PATCH-with-comment maps to AddComment
(``reopen`` / ``resume`` / ``interrupt``) plus UpdateIssue.

Scenarios that do not fit our API and are deliberately not tested here:

- 38, first half (another agent reopens through the ``tasks:manage_active_checkouts``
  override): there is no override; a non-assignee agent's reopen or resume is refused
  (tested), and the board reopens and reassigns.
- 39 (mention-granted comment and ``issue_write_not_visible``): there are no mention
  grants; every agent of the company may append comments to any of its issues
  (scenario 17 in test_scenarios_locks.py) and may not reopen or resume them (38 here).
- 40 (scheduled_retry runs superseded by a human comment): our runs have no
  ``scheduled_retry`` status; retries are new queued runs owned by the run service.
- 45, second half (429 after 20 cross-issue writes in one run): no per-run cross-issue
  rate limit in this API. The first half (an agent write without a run) is
  UNAUTHENTICATED ``AGENT_RUN_REQUIRED`` here, not 403.

Design choices pinned here: implicit reopen follows the older reference (a board comment
reopens ``done`` and ``blocked`` issues with an agent assignee) but not ``cancelled``,
which needs an explicit ``reopen`` (newest (v) behaviour); the interrupt writes an
``issue.interrupt_requested`` outbox row instead of cancelling the run itself.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import pytest

from paperclip.issues.v1 import issues_pb2
from tests.harness import Suite, expect_error
from tests.issue_service.support import (
    assert_locks,
    audit,
    comment,
    comment_count,
    events,
    make_world,
    state,
    update,
)


async def test_s30_reopen_flag_on_open_issue_changes_nothing_but_reassignment_works(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    issue = await w.issue(status="todo", assignee=w.a)

    made = await comment(w.as_board(), issue, "please pick this up", reopen=True)
    await update(w.as_board(), issue, assignee_agent_id=w.b)

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("todo", w.b)
    assert_locks(row, None)
    [added] = await audit(w.db, issue, "issue.comment_added")
    assert added["details"]["commentId"] == made.id
    assert "reopened" not in added["details"]
    [updated] = await audit(w.db, issue, "issue.updated")
    assert updated["details"]["assignee_agent_id"] == w.b
    assert "reopened" not in updated["details"]
    assert await events(w.db, issue, "issue.reopened") == []
    [commented] = await events(w.db, issue, "issue.commented")
    assert commented["target_agent_id"] == w.a
    [assigned] = await events(w.db, issue, "issue.assigned")
    assert assigned["target_agent_id"] == w.b


@pytest.mark.parametrize("closed", ["done", "cancelled"])
async def test_s31_board_explicit_reopen_of_closed_issue(suite: Suite, closed: str) -> None:
    w = await make_world(suite)
    issue = await w.issue(status=closed, user_assignee="someone")

    made = await comment(w.as_board(), issue, "not finished yet", reopen=True)

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"], row["assignee_user_id"]) == (
        "todo",
        None,
        "someone",
    )
    assert row["completed_at"] is None and row["cancelled_at"] is None
    assert_locks(row, None)
    [updated] = await audit(w.db, issue, "issue.updated")
    assert (updated["actor_type"], updated["actor_id"]) == ("user", "board-user")
    details = updated["details"]
    assert (details["status"], details["reopened"], details["reopenedFrom"], details["source"]) == (
        "todo",
        True,
        closed,
        "comment",
    )
    assert details["_previous"] == {"status": closed}
    [added] = await audit(w.db, issue, "issue.comment_added")
    assert (added["details"]["commentId"], added["details"]["reopenedFrom"]) == (made.id, closed)
    assert await events(w.db, issue) == []  # no agent to wake


async def test_s32_board_comment_reopens_done_issue_of_an_agent(suite: Suite) -> None:
    w = await make_world(suite)
    issue = await w.issue(status="done", assignee=w.a)

    made = await comment(w.as_board(), issue, "one more thing")

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("todo", w.a)
    assert_locks(row, None)
    [updated] = await audit(w.db, issue, "issue.updated")
    assert (updated["details"]["reopened"], updated["details"]["reopenedFrom"]) == (True, "done")
    [wake] = await events(w.db, issue)
    assert (wake["type"], wake["target_agent_id"]) == ("issue.reopened", w.a)
    assert wake["payload"] == {
        "issueId": issue,
        "commentId": made.id,
        "reopenedFrom": "done",
        "mutation": "comment",
        "resumeIntent": False,
    }


async def test_s32_board_comment_does_not_implicitly_reopen_cancelled_issue(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    issue = await w.issue(status="cancelled", assignee=w.a)

    await comment(w.as_board(), issue, "for the record")

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("cancelled", w.a)
    assert await audit(w.db, issue, "issue.updated") == []
    assert await events(w.db, issue) == []  # closed and not reopened: nobody is woken


async def test_s33_board_comment_reopens_blocked_issue_with_wake_payload(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    issue = await w.issue(status="blocked", assignee=w.a)

    made = await comment(w.as_board(), issue, "unblocked: the key is in the vault")

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("todo", w.a)
    assert_locks(row, None)
    [wake] = await events(w.db, issue, "issue.reopened")
    assert wake["target_agent_id"] == w.a
    assert (
        wake["payload"]["commentId"],
        wake["payload"]["reopenedFrom"],
        wake["payload"]["mutation"],
    ) == (made.id, "blocked", "comment")
    assert await events(w.db, issue, "issue.commented") == []


@pytest.mark.parametrize("blocker_status", ["todo", "cancelled"])
async def test_s34_comment_on_issue_with_unresolved_blocker_only_wakes(
    suite: Suite, blocker_status: str
) -> None:
    w = await make_world(suite)
    blocker = await w.issue(status=blocker_status)
    issue = await w.issue(status="blocked", assignee=w.a, blocked_by=(blocker,))

    made = await comment(w.as_board(), issue, "any news?")

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("blocked", w.a)
    assert await audit(w.db, issue, "issue.updated") == []
    [wake] = await events(w.db, issue)
    assert (wake["type"], wake["target_agent_id"]) == ("issue.commented", w.a)
    assert wake["payload"]["commentId"] == made.id


async def test_s35_comment_on_done_issue_of_a_user_reopens_nothing(suite: Suite) -> None:
    w = await make_world(suite)
    issue = await w.issue(status="done", user_assignee="someone")

    await comment(w.as_board(), issue, "thanks")

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_user_id"]) == ("done", "someone")
    assert row["completed_at"] is not None
    assert await audit(w.db, issue, "issue.updated") == []
    assert len(await audit(w.db, issue, "issue.comment_added")) == 1
    assert await events(w.db, issue) == []


@pytest.mark.parametrize("held_by", ["checkout", "execution"])
async def test_s36_board_comment_from_the_holding_run_does_not_reopen(
    suite: Suite, held_by: str
) -> None:
    w = await make_world(suite)
    cli_run = await w.run(w.a)  # a local CLI agent using board auth
    issue = await w.issue(
        status="done",
        assignee=w.a,
        checkout=cli_run if held_by == "checkout" else None,
        execution=cli_run if held_by == "execution" else None,
    )
    before = await state(w.db, issue)

    made = await comment(w.as_board(run_id=cli_run), issue, "done for real")

    assert made.created_by_run_id == cli_run
    assert await state(w.db, issue) == before
    assert await audit(w.db, issue, "issue.updated") == []
    assert await events(w.db, issue, "issue.reopened") == []


async def test_s36_board_comment_from_another_run_reopens(suite: Suite) -> None:
    w = await make_world(suite)
    cli_run = await w.run(w.a)
    other_run = await w.run(w.b)
    issue = await w.issue(status="done", assignee=w.a, checkout=cli_run, execution=cli_run)

    await comment(w.as_board(run_id=other_run), issue, "reopening")

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("todo", w.a)
    assert_locks(row, None)
    [updated] = await audit(w.db, issue, "issue.updated")
    assert (updated["details"]["reopenedFrom"], updated["run_id"]) == ("done", other_run)
    [wake] = await events(w.db, issue, "issue.reopened")
    assert (wake["target_agent_id"], wake["actor_run_id"]) == (w.a, other_run)


@pytest.mark.parametrize("closed", ["done", "cancelled"])
async def test_s37_assignee_reopen_flag_is_only_a_log_line(suite: Suite, closed: str) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status=closed, assignee=w.a)

    made = await comment(w.as_agent(w.a, cur), issue, "closing notes", reopen=True)

    assert (made.author_agent_id, made.created_by_run_id) == (w.a, cur)
    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == (closed, w.a)
    assert_locks(row, None)
    assert await audit(w.db, issue, "issue.updated") == []
    assert await events(w.db, issue) == []


@pytest.mark.parametrize("flag", ["reopen", "resume"])
async def test_s38_non_assignee_agent_cannot_reopen_or_resume(suite: Suite, flag: str) -> None:
    w = await make_world(suite)
    run_c = await w.run(w.c)
    issue = await w.issue(status="done", assignee=w.a)
    before = await state(w.db, issue)

    error = await expect_error(comment(w.as_agent(w.c, run_c), issue, "reopening", **{flag: True}))

    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "AGENT_MISMATCH")
    assert await state(w.db, issue) == before
    assert await comment_count(w.db, issue) == 0
    assert await audit(w.db, issue, "issue.comment_added") == []
    assert await events(w.db, issue) == []


async def test_s41_board_comment_on_in_progress_issue_wakes_without_update(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=cur, execution=cur)
    before = await state(w.db, issue)

    made = await comment(w.as_board(), issue, "also handle the edge case")

    after = await state(w.db, issue)
    assert after == before
    assert_locks(after, cur)
    assert await audit(w.db, issue, "issue.updated") == []
    [wake] = await events(w.db, issue)
    assert (wake["type"], wake["target_agent_id"]) == ("issue.commented", w.a)
    assert wake["payload"] == {"issueId": issue, "commentId": made.id}


async def test_s42_board_interrupt_asks_run_service_to_cancel_execution_run(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    run_1 = await w.run(w.a)
    issue = await w.issue(status="todo", assignee=w.a, execution=run_1)
    before = await state(w.db, issue)

    made = await comment(w.as_board(), issue, "stop, wrong approach", interrupt=True)

    # The issue service does not cancel the run itself: the lock stays until the run
    # service finalizes the cancelled run.
    assert await state(w.db, issue) == before
    [entry] = await audit(w.db, issue, "issue.interrupt_requested")
    assert entry["details"] == {
        "runId": run_1,
        "commentId": made.id,
        "source": "issue_comment_interrupt",
    }
    [interrupt] = await events(w.db, issue, "issue.interrupt_requested")
    assert interrupt["target_agent_id"] == w.a
    assert interrupt["payload"] == {"runId": run_1, "commentId": made.id}


async def test_s42_interrupt_is_board_only(suite: Suite) -> None:
    w = await make_world(suite)
    run_1 = await w.run(w.a)
    issue = await w.issue(status="in_progress", assignee=w.a, checkout=run_1, execution=run_1)
    before = await state(w.db, issue)

    error = await expect_error(comment(w.as_agent(w.a, run_1), issue, "stop", interrupt=True))

    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "BOARD_REQUIRED")
    assert await state(w.db, issue) == before
    assert await comment_count(w.db, issue) == 0
    assert await events(w.db, issue) == []


async def test_s43_assignee_plain_comment_on_done_issue_is_inert(suite: Suite) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status="done", assignee=w.a)

    await comment(w.as_agent(w.a, cur), issue, "summary of the work")

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("done", w.a)
    assert await audit(w.db, issue, "issue.updated") == []
    assert len(await audit(w.db, issue, "issue.comment_added")) == 1
    assert await events(w.db, issue) == []


async def test_s43_assignee_resume_reopens_done_issue_with_resume_intent(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    issue = await w.issue(status="done", assignee=w.a)

    made = await comment(w.as_agent(w.a, cur), issue, "found a regression", resume=True)

    row = await state(w.db, issue)
    assert (row["status"], row["assignee_agent_id"]) == ("todo", w.a)
    assert row["completed_at"] is None
    assert_locks(row, None)
    [updated] = await audit(w.db, issue, "issue.updated")
    assert (updated["actor_type"], updated["agent_id"], updated["run_id"]) == ("agent", w.a, cur)
    assert (updated["details"]["reopened"], updated["details"]["reopenedFrom"]) == (True, "done")
    [wake] = await events(w.db, issue)
    assert (wake["type"], wake["target_agent_id"], wake["actor_run_id"]) == (
        "issue.reopened",
        w.a,
        cur,
    )
    assert wake["payload"]["resumeIntent"] is True
    assert wake["payload"]["commentId"] == made.id


async def test_s43_resume_refused_on_cancelled_or_blocked_by_open_blocker(
    suite: Suite,
) -> None:
    w = await make_world(suite)
    cur = await w.run(w.a)
    cancelled = await w.issue(status="cancelled", assignee=w.a)
    blocker = await w.issue(status="todo")
    blocked = await w.issue(status="blocked", assignee=w.a, blocked_by=(blocker,))
    me = w.as_agent(w.a, cur)

    on_cancelled = await expect_error(comment(me, cancelled, "resume", resume=True))
    on_blocked = await expect_error(comment(me, blocked, "resume", resume=True))

    assert (on_cancelled.code, on_cancelled.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ISSUE_CANCELLED",
    )
    assert (on_blocked.code, on_blocked.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "ISSUE_BLOCKED",
    )
    assert (await state(w.db, cancelled))["status"] == "cancelled"
    assert (await state(w.db, blocked))["status"] == "blocked"
    for issue in (cancelled, blocked):
        assert await comment_count(w.db, issue) == 0
        assert await events(w.db, issue) == []


async def test_s44_agent_comments_wake_the_other_assignee_only(suite: Suite) -> None:
    w = await make_world(suite)
    run_a, run_b = await w.run(w.a), await w.run(w.b)
    issue_a = await w.issue(status="todo", assignee=w.a)
    issue_b = await w.issue(status="todo", assignee=w.b)
    a, b = w.as_agent(w.a, run_a), w.as_agent(w.b, run_b)

    await comment(a, issue_b, "A on B's issue")
    [wake_b] = await events(w.db, issue_b)
    assert (wake_b["type"], wake_b["target_agent_id"], wake_b["actor_agent_id"]) == (
        "issue.commented",
        w.b,
        w.a,
    )

    await comment(b, issue_b, "B on its own issue")
    assert len(await events(w.db, issue_b)) == 1

    await comment(b, issue_a, "B on A's issue")
    [wake_a] = await events(w.db, issue_a)
    assert (wake_a["type"], wake_a["target_agent_id"], wake_a["actor_run_id"]) == (
        "issue.commented",
        w.a,
        run_b,
    )
    for issue, assignee in ((issue_a, w.a), (issue_b, w.b)):
        row = await state(w.db, issue)
        assert (row["status"], row["assignee_agent_id"]) == ("todo", assignee)
        assert_locks(row, None)


async def test_s44_mentions_wake_each_agent_once_and_never_the_author(suite: Suite) -> None:
    w = await make_world(suite)
    run_b = await w.run(w.b)
    issue = await w.issue(status="todo", assignee=w.a)
    body = (
        f"@{w.names[w.a]} please pair with agent://{w.c}; "
        f"cc @{w.names[w.b].upper()} and @{w.names[w.c]}"
    )

    await comment(w.as_agent(w.b, run_b), issue, body)

    wakes = {(e["type"], e["target_agent_id"]) for e in await events(w.db, issue)}
    assert wakes == {("issue.commented", w.a), ("issue.mentioned", w.c)}
    assert len(await events(w.db, issue)) == 2


async def test_s45_agent_writes_without_a_run_are_unauthenticated(suite: Suite) -> None:
    w = await make_world(suite)
    issue = await w.issue(status="todo", assignee=w.a)
    unassigned = await w.issue(status="todo")
    no_run = w.as_agent(w.a, None)
    before = await state(w.db, issue)

    calls: list[Awaitable[Any]] = [
        comment(no_run, issue, "hello"),
        comment(no_run, unassigned, "hello"),
        update(no_run, issue, title="x"),
        no_run.issues.ReleaseIssue(issues_pb2.ReleaseIssueRequest(issue_id=issue)),
        no_run.issues.CheckoutIssue(
            issues_pb2.CheckoutIssueRequest(
                issue_id=issue, agent_id=w.a, expected_statuses=[issues_pb2.ISSUE_STATUS_TODO]
            )
        ),
        no_run.issues.CreateIssue(
            issues_pb2.CreateIssueRequest(company_id=w.company_id, title="new")
        ),
    ]
    for call in calls:
        error = await expect_error(call)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "AGENT_RUN_REQUIRED")
    assert await state(w.db, issue) == before
    for target in (issue, unassigned):
        assert await comment_count(w.db, target) == 0
        assert await events(w.db, target) == []
        assert [e["action"] for e in await audit(w.db, target)] == ["issue.created"]
