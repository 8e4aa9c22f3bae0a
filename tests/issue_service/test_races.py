"""Races over real sockets and a real PostgreSQL: checkout, identifiers, idempotent
creates and lock release while a new run checks the issue out."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
from sqlalchemy import text

from common.errors import PaperclipError, from_rpc_error
from paperclip.issues.v1 import issue_locks_pb2, issues_pb2
from paperclip.runs.v1 import agents_pb2
from tests.harness import (
    Clients,
    Suite,
    admin,
    agent,
    fetch_value,
    insert_run,
    new_agent,
    new_company,
    service,
    set_run_status,
)

CHECKOUT_RACERS = 50
CREATE_RACERS = 200
SAME_REQUEST_RACERS = 20

TODO = issues_pb2.ISSUE_STATUS_TODO
IN_PROGRESS = issues_pb2.ISSUE_STATUS_IN_PROGRESS


async def _outcome(call: Any) -> Any:
    """The response of ``call``, or the project error it failed with."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        return from_rpc_error(exc)


def _split(results: list[Any]) -> tuple[list[Any], list[PaperclipError]]:
    """(successes, project errors); anything else (a crash of the test) is re-raised."""
    wins: list[Any] = []
    errors: list[PaperclipError] = []
    for result in results:
        if isinstance(result, PaperclipError):
            errors.append(result)
        elif isinstance(result, BaseException):
            raise result
        else:
            wins.append(result)
    return wins, errors


async def _audit_count(suite: Suite, issue_id: str, action: str) -> int:
    return int(
        await fetch_value(
            suite.db,
            "SELECT count(*) FROM audit.activity_log WHERE entity_type = 'issue' "
            "AND entity_id = :id AND action = :action",
            id=issue_id,
            action=action,
        )
    )


async def _issue_row(suite: Suite, issue_id: str) -> dict[str, Any]:
    async with suite.db.transaction() as conn:
        row = (
            (
                await conn.execute(
                    text(
                        "SELECT status, assignee_agent_id, checkout_run_id, execution_run_id "
                        "FROM issues.issues WHERE id = :id"
                    ),
                    {"id": issue_id},
                )
            )
            .mappings()
            .one()
        )
    return {k: (None if v is None else str(v)) for k, v in row.items()}


async def _new_agents(board: Clients, company_id: str, count: int) -> list[agents_pb2.Agent]:
    return list(
        await asyncio.gather(
            *(
                new_agent(board, company_id, f"racer-{i}-{uuid.uuid4().hex[:6]}")
                for i in range(count)
            )
        )
    )


def _checkout(
    me: Clients, issue_id: str, agent_id: str, *statuses: issues_pb2.IssueStatus.ValueType
) -> Any:
    return me.issues.CheckoutIssue(
        issues_pb2.CheckoutIssueRequest(
            issue_id=issue_id, agent_id=agent_id, expected_statuses=list(statuses or (TODO,))
        )
    )


def _assert_conflicts(errors: list[PaperclipError], winner_run: str) -> None:
    for error in errors:
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION, (error.code, error.message)
        assert error.reason == "ISSUE_CHECKOUT_CONFLICT", error.reason
        assert error.metadata.get("holder_live") == "true", error.metadata
        # The holder's run id is among the metadata (the key name is not a contract).
        assert winner_run in error.metadata.values(), error.metadata


async def test_fifty_agents_race_for_one_unassigned_issue(suite: Suite) -> None:
    board = suite.clients(admin())
    company = await new_company(board, "Race Co")
    bots = await _new_agents(board, company.id, CHECKOUT_RACERS)
    issue = await board.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company.id, title="Contested", status=TODO)
    )
    runs = [await insert_run(suite.db, company_id=company.id, agent_id=b.id) for b in bots]
    # One channel per agent, each signing as that agent inside its own live run.
    callers = [suite.clients(agent(b.id, company.id, r)) for b, r in zip(bots, runs, strict=True)]

    results = await asyncio.gather(
        *(_outcome(_checkout(me, issue.id, b.id)) for me, b in zip(callers, bots, strict=True)),
        return_exceptions=True,
    )

    wins, errors = _split(results)
    assert len(wins) == 1, [(e.code, e.reason) for e in errors]
    assert len(errors) == CHECKOUT_RACERS - 1
    winner: issues_pb2.Issue = wins[0]
    winner_index = [b.id for b in bots].index(winner.assignee_agent_id)
    winner_run = runs[winner_index]
    assert winner.checkout_run_id == winner_run == winner.execution_run_id
    assert winner.status == IN_PROGRESS
    _assert_conflicts(errors, winner_run)
    assert await _audit_count(suite, issue.id, "issue.checked_out") == 1
    row = await _issue_row(suite, issue.id)
    assert row == {
        "status": "in_progress",
        "assignee_agent_id": winner.assignee_agent_id,
        "checkout_run_id": winner_run,
        "execution_run_id": winner_run,
    }


async def test_fifty_runs_of_one_assigned_agent_race(suite: Suite) -> None:
    board = suite.clients(admin())
    company = await new_company(board, "Race Co")
    bot = await new_agent(board, company.id)
    issue = await board.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(
            company_id=company.id, title="Contested", status=TODO, assignee_agent_id=bot.id
        )
    )
    runs = [
        await insert_run(suite.db, company_id=company.id, agent_id=bot.id)
        for _ in range(CHECKOUT_RACERS)
    ]
    callers = [suite.clients(agent(bot.id, company.id, r)) for r in runs]

    results = await asyncio.gather(
        *(_outcome(_checkout(me, issue.id, bot.id)) for me in callers),
        return_exceptions=True,
    )

    wins, errors = _split(results)
    assert len(wins) == 1, [(e.code, e.reason) for e in errors]
    assert len(errors) == CHECKOUT_RACERS - 1
    winner: issues_pb2.Issue = wins[0]
    assert winner.checkout_run_id in runs
    assert winner.execution_run_id == winner.checkout_run_id
    assert winner.assignee_agent_id == bot.id
    _assert_conflicts(errors, winner.checkout_run_id)
    assert await _audit_count(suite, issue.id, "issue.checked_out") == 1
    row = await _issue_row(suite, issue.id)
    assert row["checkout_run_id"] == winner.checkout_run_id == row["execution_run_id"]
    assert row["status"] == "in_progress"


async def test_concurrent_creates_get_consecutive_identifiers(suite: Suite) -> None:
    board = suite.clients(admin())
    company = await new_company(board, "Counter Co")
    callers = [suite.clients(admin()) for _ in range(10)]

    results = await asyncio.gather(
        *(
            _outcome(
                callers[i % len(callers)].issues.CreateIssue(
                    issues_pb2.CreateIssueRequest(company_id=company.id, title=f"Issue {i}")
                )
            )
            for i in range(CREATE_RACERS)
        ),
        return_exceptions=True,
    )

    wins, errors = _split(results)
    assert not errors, sorted({(e.code.name, e.reason) for e in errors})
    numbers = sorted(issue.issue_number for issue in wins)
    assert numbers == list(range(1, CREATE_RACERS + 1))
    identifiers = {issue.identifier for issue in wins}
    assert identifiers == {f"{company.issue_prefix}-{n}" for n in range(1, CREATE_RACERS + 1)}
    assert len({issue.id for issue in wins}) == CREATE_RACERS
    stored = await fetch_value(
        suite.db, "SELECT count(*) FROM issues.issues WHERE company_id = :c", c=company.id
    )
    assert stored == CREATE_RACERS
    counter = await fetch_value(
        suite.db, "SELECT issue_counter FROM issues.companies WHERE id = :c", c=company.id
    )
    assert counter == CREATE_RACERS


async def test_concurrent_creates_with_one_request_id_create_once(suite: Suite) -> None:
    board = suite.clients(admin())
    company = await new_company(board, "Idem Co")
    before = await board.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company.id, title="Before")
    )
    request_id = str(uuid.uuid4())
    callers = [suite.clients(admin()) for _ in range(SAME_REQUEST_RACERS)]

    results = await asyncio.gather(
        *(
            _outcome(
                me.issues.CreateIssue(
                    issues_pb2.CreateIssueRequest(
                        company_id=company.id, title="Once", request_id=request_id
                    )
                )
            )
            for me in callers
        ),
        return_exceptions=True,
    )

    wins, errors = _split(results)
    assert not errors, sorted({(e.code.name, e.reason, e.message) for e in errors})
    assert len({issue.id for issue in wins}) == 1
    created: issues_pb2.Issue = wins[0]
    assert created.issue_number == before.issue_number + 1
    assert {issue.identifier for issue in wins} == {created.identifier}
    rows = await fetch_value(
        suite.db,
        "SELECT count(*) FROM issues.issues WHERE company_id = :c AND create_request_id = :r",
        c=company.id,
        r=request_id,
    )
    assert rows == 1
    assert await _audit_count(suite, created.id, "issue.created") == 1
    after = await board.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company.id, title="After")
    )
    assert after.issue_number == created.issue_number + 1
    # A later retry of the same request still answers the first issue.
    again = await board.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company.id, title="Once", request_id=request_id)
    )
    assert again.id == created.id


@pytest.mark.parametrize("round_", range(5))
async def test_release_run_locks_races_checkout_by_new_run(suite: Suite, round_: int) -> None:
    board = suite.clients(admin())
    company = await new_company(board, f"Release Co {round_}")
    bot = await new_agent(board, company.id)
    old_run = await insert_run(suite.db, company_id=company.id, agent_id=bot.id)
    old = suite.clients(agent(bot.id, company.id, old_run))
    issues = []
    for i in range(4):
        issue = await board.issues.CreateIssue(
            issues_pb2.CreateIssueRequest(
                company_id=company.id, title=f"Held {i}", status=TODO, assignee_agent_id=bot.id
            )
        )
        held = await _checkout(old, issue.id, bot.id)
        assert held.checkout_run_id == old_run
        issues.append(issue)
    await set_run_status(suite.db, old_run, "failed")
    new_run = await insert_run(suite.db, company_id=company.id, agent_id=bot.id)
    new = suite.clients(agent(bot.id, company.id, new_run))
    locks = suite.clients(service())

    release = _outcome(
        locks.locks.ReleaseRunLocks(issue_locks_pb2.ReleaseRunLocksRequest(run_id=old_run))
    )
    # Checkouts of half the issues race the release; the rest are left to it alone.
    checkouts = [
        _outcome(_checkout(new, issue.id, bot.id, TODO, IN_PROGRESS)) for issue in issues[:2]
    ]
    if round_ % 2:
        results = await asyncio.gather(*checkouts, release, return_exceptions=True)
    else:
        results = await asyncio.gather(release, *checkouts, return_exceptions=True)

    wins, errors = _split(results)
    assert not errors, [(e.code.name, e.reason, e.message) for e in errors]
    released = next(r for r in wins if isinstance(r, issue_locks_pb2.ReleaseRunLocksResponse))
    assert set(released.issue_ids) <= {i.id for i in issues}
    assert {i.id for i in issues[2:]} <= set(released.issue_ids)
    for result in wins:
        if isinstance(result, issues_pb2.Issue):
            assert result.checkout_run_id == new_run == result.execution_run_id
    for index, issue in enumerate(issues):
        row = await _issue_row(suite, issue.id)
        assert old_run not in (row["checkout_run_id"], row["execution_run_id"]), row
        if index < 2:
            assert row["checkout_run_id"] == new_run == row["execution_run_id"], row
            assert row["status"] == "in_progress"
        else:
            assert row["checkout_run_id"] is None and row["execution_run_id"] is None, row
    # Repeating the release is safe and finds nothing more to clear.
    again = await locks.locks.ReleaseRunLocks(
        issue_locks_pb2.ReleaseRunLocksRequest(run_id=old_run)
    )
    assert list(again.issue_ids) == []
