"""ReconcileStrandedIssues.

Issues and runs are seeded by SQL in a fresh company per test; the issue service is
real (escalation goes through EscalateStrandedIssue). Passes are scoped to the test's
company (tests share one database), except the one through the RPC.
"""

from __future__ import annotations

import uuid

from common.actor import Role, service_actor
from common.db import Database
from common.sql import Row, sql
from paperclip.issues.v1 import issues_pb2
from paperclip.runs.v1 import runs_pb2
from run_service.reconcile import Action, decide, reconcile_stranded_issues
from run_service.runner import Runner
from tests.harness import Clients, Suite, admin, board, expect_error, new_agent

SERVICE = service_actor("run_service")


async def _issue(
    db: Database, clients: Clients, company: str, agent: str | None, status: str
) -> str:
    issue = await clients.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company, title=f"stranded {uuid.uuid4().hex[:6]}")
    )
    async with db.unit_of_work() as tx:
        if agent is None:
            await tx.execute(
                sql(
                    "UPDATE issues.issues SET assignee_user_id = 'someone', status = :s"
                    " WHERE id = :i"
                ),
                {"s": status, "i": issue.id},
            )
        else:
            await tx.execute(
                sql("UPDATE issues.issues SET assignee_agent_id = :a, status = :s WHERE id = :i"),
                {"a": agent, "s": status, "i": issue.id},
            )
    return issue.id


async def _run(
    db: Database,
    company: str,
    agent: str,
    issue: str,
    status: str,
    *,
    retry_reason: str | None = None,
    error_code: str | None = None,
    error: str | None = None,
) -> str:
    async with db.unit_of_work() as tx:
        run = await tx.fetchval(
            sql(
                """
                INSERT INTO runs.heartbeat_runs
                    (company_id, agent_id, issue_id, status, invocation_source, wake_reason,
                     retry_reason, error_code, error, started_at, finished_at)
                VALUES (:c, :a, :i, :s, 'assignment', 'issue_assigned', :rr, :ec, :e,
                        now(), now())
                RETURNING id
                """
            ),
            {
                "c": company,
                "a": agent,
                "i": issue,
                "s": status,
                "rr": retry_reason,
                "ec": error_code,
                "e": error,
            },
        )
    return str(run)


async def _runs(db: Database, issue: str) -> list[Row]:
    async with db.unit_of_work() as tx:
        return await tx.fetch(
            sql("SELECT * FROM runs.heartbeat_runs WHERE issue_id = :i ORDER BY created_at"),
            {"i": issue},
        )


async def _issue_row(db: Database, issue: str) -> Row:
    async with db.unit_of_work() as tx:
        row = await tx.fetchrow(sql("SELECT * FROM issues.issues WHERE id = :i"), {"i": issue})
    assert row is not None
    return row


async def _comments(db: Database, issue: str) -> list[str]:
    async with db.unit_of_work() as tx:
        rows = await tx.fetch(
            sql("SELECT body FROM issues.issue_comments WHERE issue_id = :i"), {"i": issue}
        )
    return [r["body"] for r in rows]


async def _pass(
    db: Database, runner: Runner, company: str
) -> runs_pb2.ReconcileStrandedIssuesResponse:
    return await reconcile_stranded_issues(db, runner, SERVICE, company_ids=[company])


def _counters(r: runs_pb2.ReconcileStrandedIssuesResponse) -> tuple[int, int, int, int]:
    return (r.dispatch_requeued, r.continuation_requeued, r.escalated, r.skipped)


def test_decision_table() -> None:
    assert decide("todo", None, None, has_run_link=False) is Action.SKIP
    assert decide("todo", "succeeded", None, has_run_link=False) is Action.SKIP
    assert decide("todo", "failed", None, has_run_link=False) is Action.REQUEUE_DISPATCH
    assert decide("todo", "cancelled", "issue_continuation_needed", has_run_link=False) is (
        Action.REQUEUE_DISPATCH
    )
    assert decide("todo", "failed", "assignment_recovery", has_run_link=False) is (
        Action.ESCALATE_DISPATCH
    )
    assert decide("todo", "succeeded", "assignment_recovery", has_run_link=False) is Action.SKIP
    assert decide("in_progress", None, None, has_run_link=False) is Action.SKIP
    assert decide("in_progress", None, None, has_run_link=True) is Action.REQUEUE_CONTINUATION
    assert decide("in_progress", "failed", None, has_run_link=False) is (
        Action.REQUEUE_CONTINUATION
    )
    assert decide("in_progress", "timed_out", "issue_continuation_needed", has_run_link=False) is (
        Action.ESCALATE_CONTINUATION
    )
    assert decide("in_progress", "succeeded", "issue_continuation_needed", has_run_link=False) is (
        Action.REQUEUE_CONTINUATION
    )


async def test_a8_todo_issue_whose_last_run_failed_is_dispatched_again(
    db: Database, runner: Runner, admin_clients: Clients, company_id: str
) -> None:
    agent = (await new_agent(admin_clients, company_id)).id
    issue = await _issue(db, admin_clients, company_id, agent, "todo")
    failed = await _run(db, company_id, agent, issue, "failed", error_code="adapter_failed")
    result = await _pass(db, runner, company_id)
    assert _counters(result) == (1, 0, 0, 0)
    assert list(result.issue_ids) == [issue]
    runs = await _runs(db, issue)
    assert len(runs) == 2
    new = runs[-1]
    assert (new["status"], new["retry_reason"], str(new["retry_of_run_id"])) == (
        "queued",
        "assignment_recovery",
        failed,
    )
    assert new["wake_reason"] == "issue_assignment_recovery"
    # The queued run is a live path now: a second pass leaves the issue alone.
    assert _counters(await _pass(db, runner, company_id)) == (0, 0, 0, 0)
    assert len(await _runs(db, issue)) == 2


async def test_a9_todo_issue_whose_dispatch_retry_failed_is_escalated_once(
    db: Database, runner: Runner, admin_clients: Clients, company_id: str
) -> None:
    agent = (await new_agent(admin_clients, company_id)).id
    issue = await _issue(db, admin_clients, company_id, agent, "todo")
    await _run(db, company_id, agent, issue, "failed", error_code="adapter_failed")
    await _run(
        db,
        company_id,
        agent,
        issue,
        "failed",
        retry_reason="assignment_recovery",
        error_code="process_lost",
        error="run failed before issue advanced",
    )
    result = await _pass(db, runner, company_id)
    assert _counters(result) == (0, 0, 1, 0)
    assert list(result.issue_ids) == [issue]
    assert (await _issue_row(db, issue))["status"] == "blocked"
    comments = await _comments(db, issue)
    assert len(comments) == 1
    assert "retried dispatch" in comments[0]
    assert "Moving it to `blocked`" in comments[0]
    assert "Latest retry failure: `process_lost` - run failed before issue advanced." in comments[0]
    assert len(await _runs(db, issue)) == 2
    # Twice: no second comment (blocked is no candidate; the key is stable anyway).
    assert _counters(await _pass(db, runner, company_id)) == (0, 0, 0, 0)
    async with db.unit_of_work() as tx:  # even if it were reopened to todo
        await tx.execute(
            sql("UPDATE issues.issues SET status = 'todo' WHERE id = :i"), {"i": issue}
        )
    assert _counters(await _pass(db, runner, company_id)) == (0, 0, 0, 1)
    assert len(await _comments(db, issue)) == 1


async def test_escalation_summary_is_cut_to_240_characters(
    db: Database, runner: Runner, admin_clients: Clients, company_id: str
) -> None:
    agent = (await new_agent(admin_clients, company_id)).id
    issue = await _issue(db, admin_clients, company_id, agent, "todo")
    await _run(
        db,
        company_id,
        agent,
        issue,
        "timed_out",
        retry_reason="assignment_recovery",
        error_code="timeout",
        error="x" * 1000,
    )
    assert _counters(await _pass(db, runner, company_id)) == (0, 0, 1, 0)
    (body,) = await _comments(db, issue)
    assert body.endswith(" Latest retry failure: `timeout` - " + "x" * 240 + ".")


async def test_a10_in_progress_issue_whose_last_run_failed_is_continued(
    db: Database, runner: Runner, admin_clients: Clients, company_id: str
) -> None:
    agent = (await new_agent(admin_clients, company_id)).id
    issue = await _issue(db, admin_clients, company_id, agent, "in_progress")
    failed = await _run(db, company_id, agent, issue, "failed", error_code="adapter_failed")
    result = await _pass(db, runner, company_id)
    assert _counters(result) == (0, 1, 0, 0)
    assert list(result.issue_ids) == [issue]
    runs = await _runs(db, issue)
    assert len(runs) == 2
    assert (runs[-1]["retry_reason"], str(runs[-1]["retry_of_run_id"])) == (
        "issue_continuation_needed",
        failed,
    )
    assert runs[-1]["wake_reason"] == "issue_continuation_needed"
    assert (await _issue_row(db, issue))["status"] == "in_progress"


async def test_a11_in_progress_issue_without_runs_or_links_is_skipped(
    db: Database, runner: Runner, admin_clients: Clients, company_id: str
) -> None:
    agent = (await new_agent(admin_clients, company_id)).id
    issue = await _issue(db, admin_clients, company_id, agent, "in_progress")
    result = await _pass(db, runner, company_id)
    assert _counters(result) == (0, 0, 0, 1)
    assert list(result.issue_ids) == []
    assert await _runs(db, issue) == []
    assert (await _issue_row(db, issue))["status"] == "in_progress"


async def test_in_progress_issue_with_a_dangling_run_link_is_continued(
    db: Database, runner: Runner, admin_clients: Clients, company_id: str
) -> None:
    agent = (await new_agent(admin_clients, company_id)).id
    issue = await _issue(db, admin_clients, company_id, agent, "in_progress")
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql("UPDATE issues.issues SET checkout_run_id = gen_random_uuid() WHERE id = :i"),
            {"i": issue},
        )
    assert _counters(await _pass(db, runner, company_id)) == (0, 1, 0, 0)
    runs = await _runs(db, issue)
    assert len(runs) == 1 and runs[0]["retry_of_run_id"] is None


async def test_a14_in_progress_issue_whose_continuation_failed_is_escalated(
    db: Database, runner: Runner, admin_clients: Clients, company_id: str
) -> None:
    agent = (await new_agent(admin_clients, company_id)).id
    issue = await _issue(db, admin_clients, company_id, agent, "in_progress")
    await _run(
        db,
        company_id,
        agent,
        issue,
        "failed",
        retry_reason="issue_continuation_needed",
        error_code="process_lost",
        error="run failed before issue advanced.",
    )
    result = await _pass(db, runner, company_id)
    assert _counters(result) == (0, 0, 1, 0)
    assert (await _issue_row(db, issue))["status"] == "blocked"
    (body,) = await _comments(db, issue)
    assert "retried continuation" in body
    assert "Latest retry failure: `process_lost` - run failed before issue advanced." in body
    assert len(await _runs(db, issue)) == 1


async def test_a15_successful_continuation_that_left_the_issue_open_is_continued(
    db: Database, runner: Runner, admin_clients: Clients, company_id: str
) -> None:
    agent = (await new_agent(admin_clients, company_id)).id
    issue = await _issue(db, admin_clients, company_id, agent, "in_progress")
    await _run(db, company_id, agent, issue, "succeeded", retry_reason="issue_continuation_needed")
    result = await _pass(db, runner, company_id)
    assert _counters(result) == (0, 1, 0, 0)
    assert (await _issue_row(db, issue))["status"] == "in_progress"
    assert await _comments(db, issue) == []
    assert len(await _runs(db, issue)) == 2


async def test_a16_user_assigned_issue_is_never_touched(
    db: Database, runner: Runner, admin_clients: Clients, company_id: str
) -> None:
    agent = (await new_agent(admin_clients, company_id)).id
    issue = await _issue(db, admin_clients, company_id, None, "todo")
    await _run(db, company_id, agent, issue, "failed", error_code="adapter_failed")
    result = await _pass(db, runner, company_id)
    assert _counters(result) == (0, 0, 0, 0)
    assert (await _issue_row(db, issue))["status"] == "todo"
    assert len(await _runs(db, issue)) == 1


async def test_paused_agent_and_live_paths_are_not_candidates(
    db: Database, runner: Runner, admin_clients: Clients, company_id: str
) -> None:
    paused = (await new_agent(admin_clients, company_id)).id
    busy = (await new_agent(admin_clients, company_id)).id
    paused_issue = await _issue(db, admin_clients, company_id, paused, "todo")
    busy_issue = await _issue(db, admin_clients, company_id, busy, "todo")
    await _run(db, company_id, paused, paused_issue, "failed")
    await _run(db, company_id, busy, busy_issue, "failed")
    await _run(db, company_id, busy, busy_issue, "running")
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql("UPDATE runs.agents SET status = 'paused' WHERE id = :a"), {"a": paused}
        )
    assert _counters(await _pass(db, runner, company_id)) == (0, 0, 0, 0)
    assert len(await _runs(db, paused_issue)) == 1
    assert len(await _runs(db, busy_issue)) == 2


async def test_reconcile_through_the_rpc_as_instance_admin(
    suite: Suite, db: Database, admin_clients: Clients, company_id: str
) -> None:
    agent = (await new_agent(admin_clients, company_id)).id
    issue = await _issue(db, admin_clients, company_id, agent, "todo")
    await _run(db, company_id, agent, issue, "cancelled", error_code="cancelled")
    result = await suite.clients(admin()).runs.ReconcileStrandedIssues(
        runs_pb2.ReconcileStrandedIssuesRequest()
    )
    assert issue in result.issue_ids
    assert result.dispatch_requeued >= 1
    runs = await _runs(db, issue)
    assert [r["retry_reason"] for r in runs] == [None, "assignment_recovery"]


async def test_reconcile_is_refused_to_company_board_users(suite: Suite, company_id: str) -> None:
    clients = suite.clients(board(company_id, Role.ADMIN))
    error = await expect_error(
        clients.runs.ReconcileStrandedIssues(runs_pb2.ReconcileStrandedIssuesRequest())
    )
    assert error.reason == "BOARD_REQUIRED"
