"""Checkout happy path over real sockets."""

from __future__ import annotations

from paperclip.issues.v1 import issues_pb2
from tests.harness import Suite, admin, agent, insert_run, new_agent, new_company


async def test_agent_checks_out_and_releases(suite: Suite) -> None:
    board = suite.clients(admin())
    company = await new_company(board)
    bot = await new_agent(board, company.id)
    issue = await board.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(
            company_id=company.id,
            title="Fix it",
            assignee_agent_id=bot.id,
            status=issues_pb2.ISSUE_STATUS_TODO,
        )
    )
    assert issue.identifier == f"{company.issue_prefix}-1"
    run = await insert_run(suite.db, company_id=company.id, agent_id=bot.id)
    me = suite.clients(agent(bot.id, company.id, run))
    out = await me.issues.CheckoutIssue(
        issues_pb2.CheckoutIssueRequest(
            issue_id=issue.id, agent_id=bot.id, expected_statuses=[issues_pb2.ISSUE_STATUS_TODO]
        )
    )
    assert out.status == issues_pb2.ISSUE_STATUS_IN_PROGRESS
    assert out.checkout_run_id == run == out.execution_run_id
    released = await me.issues.ReleaseIssue(issues_pb2.ReleaseIssueRequest(issue_id=issue.id))
    assert released.status == issues_pb2.ISSUE_STATUS_TODO
    assert not released.checkout_run_id and not released.assignee_agent_id
