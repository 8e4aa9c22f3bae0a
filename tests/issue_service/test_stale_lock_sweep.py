"""The periodic stale-lock sweep clears locks of terminal or missing runs only."""

from __future__ import annotations

from issue_service.sweeper import sweep_once
from paperclip.issues.v1 import issues_pb2
from tests.harness import (
    Suite,
    admin,
    agent,
    delete_run,
    fetch_value,
    insert_run,
    new_agent,
    new_company,
    set_run_status,
)


async def _checked_out(suite: Suite) -> tuple[str, str, str]:
    board = suite.clients(admin())
    company = await new_company(board)
    bot = await new_agent(board, company.id)
    issue = await board.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(
            company_id=company.id, title="t", status=issues_pb2.ISSUE_STATUS_TODO
        )
    )
    run = await insert_run(suite.db, company_id=company.id, agent_id=bot.id)
    await suite.clients(agent(bot.id, company.id, run)).issues.CheckoutIssue(
        issues_pb2.CheckoutIssueRequest(
            issue_id=issue.id, agent_id=bot.id, expected_statuses=[issues_pb2.ISSUE_STATUS_TODO]
        )
    )
    return company.id, issue.id, run


async def _locks(suite: Suite, issue_id: str) -> tuple[object, object]:
    checkout = await fetch_value(
        suite.db, "SELECT checkout_run_id FROM issues.issues WHERE id = :i", i=issue_id
    )
    execution = await fetch_value(
        suite.db, "SELECT execution_run_id FROM issues.issues WHERE id = :i", i=issue_id
    )
    return checkout, execution


async def test_sweep_clears_locks_of_failed_run_and_audits(suite: Suite) -> None:
    _, issue_id, run = await _checked_out(suite)
    await set_run_status(suite.db, run, "failed")
    cleared = await sweep_once(suite.db, batch=10_000)
    assert issue_id in cleared
    assert await _locks(suite, issue_id) == (None, None)
    status = await fetch_value(
        suite.db, "SELECT status FROM issues.issues WHERE id = :i", i=issue_id
    )
    assert status == "in_progress"
    audits = await fetch_value(
        suite.db,
        "SELECT count(*) FROM audit.activity_log WHERE entity_id = :i "
        "AND action = 'issue.stale_lock_reconciled'",
        i=issue_id,
    )
    assert audits == 1


async def test_sweep_clears_locks_of_missing_run(suite: Suite) -> None:
    _, issue_id, run = await _checked_out(suite)
    await delete_run(suite.db, run)
    assert issue_id in await sweep_once(suite.db, batch=10_000)
    assert await _locks(suite, issue_id) == (None, None)


async def test_sweep_leaves_live_run_locks_alone(suite: Suite) -> None:
    _, issue_id, run = await _checked_out(suite)
    cleared = await sweep_once(suite.db, batch=10_000)
    assert issue_id not in cleared
    checkout, execution = await _locks(suite, issue_id)
    assert str(checkout) == run == str(execution)
