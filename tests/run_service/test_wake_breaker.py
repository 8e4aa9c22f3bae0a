"""The wake-loop breaker, agents' daily run budgets and the expiry of runs queued too
long, on real PostgreSQL (wakes decided by ``wake_agent`` directly; notices posted to
the session's real issue service; expiry through the real runner's clients)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from common.actor import Role
from common.db import Database
from common.errors import InvalidArgument
from paperclip.runs.v1 import agents_pb2
from paperclip.runs.v1 import run_messages_pb2 as pb
from run_service import queue_age, wake_breaker
from run_service.issue_client import IssueClient
from run_service.wakes import promote_deferred
from tests.conftest import Services
from tests.harness import Suite, admin, board, expect_error, new_company
from tests.run_service.test_wakes import (
    rows,
    runs_of_issue,
    seed_agent,
    seed_company,
    seed_issue,
    wake,
)

REASON = "issue_commented"


@pytest.fixture
def small_breaker() -> Iterator[wake_breaker.BreakerPolicy]:
    """A breaker that trips at 3 runs in 30 minutes, for this test only."""
    policy = wake_breaker.BreakerPolicy(loop_runs=3, loop_window_seconds=1800)
    wake_breaker.configure(policy)
    try:
        yield policy
    finally:
        wake_breaker.configure(wake_breaker.BreakerPolicy())


async def _finish(db: Database, run_id: str) -> None:
    await rows(
        db,
        "UPDATE runs.heartbeat_runs SET status = 'succeeded', finished_at = now()"
        " WHERE id = :r RETURNING id",
        r=run_id,
    )


async def _run_to_end(db: Database, agent: str, issue: str | None, reason: str = REASON) -> Any:
    """One wake; when it queued a run, that run ends succeeded at once."""
    out = await wake(db, agent, issue_id=issue or "", reason=reason)
    if out.HasField("run"):
        await _finish(db, out.run.id)
    return out


async def _activity(db: Database, company: str, issue: str, **row: Any) -> None:
    async with db.transaction() as conn:
        await conn.execute(
            text(
                """
                INSERT INTO audit.activity_log
                    (company_id, actor_type, actor_id, action, entity_type, entity_id, details)
                VALUES (:c, :t, :who, :action, 'issue', :i, CAST(:details AS jsonb))
                """
            ),
            {"c": company, "i": issue, "details": "{}", **row},
        )


async def test_the_breaker_trips_on_one_agent_issue_and_reason(
    db: Database, small_breaker: wake_breaker.BreakerPolicy
) -> None:
    company = await seed_company(db)
    agent = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    for _ in range(3):
        assert (await _run_to_end(db, agent, issue)).wakeup_request.status == (
            pb.WAKEUP_STATUS_QUEUED
        )
    stopped = await _run_to_end(db, agent, issue)
    assert stopped.wakeup_request.status == pb.WAKEUP_STATUS_SKIPPED
    assert stopped.wakeup_request.skip_reason == wake_breaker.LOOP_SUSPECTED
    assert not stopped.HasField("run")
    # Another reason on the issue, and the same reason without an issue, still run.
    assert (await _run_to_end(db, agent, issue, "issue_assigned")).HasField("run")
    assert (await _run_to_end(db, agent, None)).HasField("run")
    # The trip stands: one trip row, one audit row, however many wakes are skipped.
    again = await _run_to_end(db, agent, issue)
    assert again.wakeup_request.skip_reason == wake_breaker.LOOP_SUSPECTED
    trips = await rows(db, "SELECT * FROM runs.wake_breakers WHERE agent_id = :a", a=agent)
    assert [(t["kind"], t["reason"], t["runs"]) for t in trips] == [("wake_loop", REASON, 3)]
    audit = await rows(
        db,
        "SELECT entity_id, details FROM audit.activity_log"
        " WHERE company_id = :c AND action = 'run.wake_loop_suspected'",
        c=company,
    )
    assert len(audit) == 1 and audit[0]["entity_id"] == issue
    assert audit[0]["details"]["wakeReason"] == REASON
    assert len([r for r in await runs_of_issue(db, issue) if r["wake_reason"] == REASON]) == 3


async def test_a_standing_trip_outlasts_its_window_until_cleared(
    db: Database, small_breaker: wake_breaker.BreakerPolicy
) -> None:
    company = await seed_company(db)
    agent = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    for _ in range(4):
        await _run_to_end(db, agent, issue)
    # The runs that tripped it fall out of the window: still stopped.
    await rows(
        db,
        "UPDATE runs.heartbeat_runs SET created_at = now() - interval '2 hours'"
        " WHERE agent_id = :a RETURNING id",
        a=agent,
    )
    assert (await _run_to_end(db, agent, issue)).wakeup_request.skip_reason == (
        wake_breaker.LOOP_SUSPECTED
    )
    # An agent's comment does not clear it; a board user's comment does.
    await _activity(db, company, issue, t="agent", who=agent, action="issue.comment_added")
    assert not (await _run_to_end(db, agent, issue)).HasField("run")
    await _activity(db, company, issue, t="user", who="owner", action="issue.comment_added")
    for _ in range(3):
        assert (await _run_to_end(db, agent, issue)).HasField("run")
    # Counted from the clearing on: the fourth trips it again.
    assert not (await _run_to_end(db, agent, issue)).HasField("run")
    trips = await rows(db, "SELECT id FROM runs.wake_breakers WHERE agent_id = :a", a=agent)
    assert len(trips) == 2


async def test_a_status_change_clears_the_breaker(
    db: Database, small_breaker: wake_breaker.BreakerPolicy
) -> None:
    company = await seed_company(db)
    agent = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    for _ in range(4):
        await _run_to_end(db, agent, issue)
    await _activity(db, company, issue, t="agent", who=agent, action="issue.updated")
    assert not (await _run_to_end(db, agent, issue)).HasField("run")  # not a status change
    async with db.transaction() as conn:
        await conn.execute(
            text(
                "INSERT INTO audit.activity_log (company_id, actor_type, actor_id, action,"
                " entity_type, entity_id, details) VALUES (:c, 'agent', :a, 'issue.updated',"
                " 'issue', :i, CAST(:d AS jsonb))"
            ),
            {"c": company, "a": agent, "i": issue, "d": '{"status": "in_review"}'},
        )
    assert (await _run_to_end(db, agent, issue)).HasField("run")


async def test_a_deferred_wake_is_not_promoted_past_a_trip(
    db: Database, small_breaker: wake_breaker.BreakerPolicy
) -> None:
    company = await seed_company(db)
    agent = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    for _ in range(2):
        await _run_to_end(db, agent, issue)
    running = await wake(db, agent, issue_id=issue, reason=REASON)
    await rows(
        db,
        "UPDATE runs.heartbeat_runs SET status = 'running' WHERE id = :r RETURNING id",
        r=running.run.id,
    )
    deferred = await wake(db, agent, issue_id=issue, reason="approval_approved")
    assert deferred.wakeup_request.status == pb.WAKEUP_STATUS_DEFERRED
    # Make the deferred wake one of the tripped reason, then end the run and promote.
    await rows(
        db,
        "UPDATE runs.wakeup_requests SET reason = :r WHERE id = :w RETURNING id",
        r=REASON,
        w=deferred.wakeup_request.id,
    )
    await _finish(db, running.run.id)
    assert await promote_deferred(db, issue) is None
    (row,) = await rows(
        db,
        "SELECT status, skip_reason FROM runs.wakeup_requests WHERE id = :w",
        w=deferred.wakeup_request.id,
    )
    assert (row["status"], row["skip_reason"]) == ("skipped", wake_breaker.LOOP_SUSPECTED)


async def test_a_daily_run_budget_stops_wakes_of_the_agent(db: Database) -> None:
    company = await seed_company(db)
    agent = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    await rows(
        db, "UPDATE runs.agents SET daily_run_budget = 2 WHERE id = :a RETURNING id", a=agent
    )
    assert (await _run_to_end(db, agent, None, "timer_tick")).HasField("run")
    assert (await _run_to_end(db, agent, issue, "issue_assigned")).HasField("run")
    for target in (issue, None, issue):
        out = await _run_to_end(db, agent, target, "on_demand")
        assert out.wakeup_request.skip_reason == wake_breaker.BUDGET_EXHAUSTED
    trips = await rows(
        db,
        "SELECT issue_id FROM runs.wake_breakers WHERE agent_id = :a ORDER BY tripped_at",
        a=agent,
    )
    # One trip (and notice) per issue and day, and one for issue-less wakes.
    assert [str(t["issue_id"]) if t["issue_id"] else None for t in trips] == [issue, None]
    # Runs older than a day no longer count.
    await rows(
        db,
        "UPDATE runs.heartbeat_runs SET created_at = now() - interval '25 hours'"
        " WHERE agent_id = :a RETURNING id",
        a=agent,
    )
    assert (await _run_to_end(db, agent, issue, "on_demand")).HasField("run")


async def test_daily_run_budget_is_part_of_the_runtime_config(suite: Suite) -> None:
    company = (await new_company(suite.clients(admin()))).id
    owner = suite.clients(board(company, Role.ADMIN, user_id="owner"))
    created = await owner.runs.CreateAgent(
        agents_pb2.CreateAgentRequest(
            company_id=company,
            name=f"budget-{uuid.uuid4().hex[:8]}",
            adapter_type="process",
            adapter_config=agents_pb2.AdapterConfig(command=["true"]),
            runtime_config=agents_pb2.RuntimeConfig(daily_run_budget=50),
        )
    )
    assert created.runtime_config.daily_run_budget == 50
    err = await expect_error(
        owner.runs.CreateAgent(
            agents_pb2.CreateAgentRequest(
                company_id=company,
                name=f"budget-{uuid.uuid4().hex[:8]}",
                adapter_type="process",
                adapter_config=agents_pb2.AdapterConfig(command=["true"]),
                runtime_config=agents_pb2.RuntimeConfig(daily_run_budget=100_001),
            )
        )
    )
    assert isinstance(err, InvalidArgument)
    assert [v.field for v in err.violations] == ["runtime_config.daily_run_budget"]


async def test_notices_are_posted_once_on_the_issue(
    db: Database, services: Services, small_breaker: wake_breaker.BreakerPolicy
) -> None:
    board_clients = services.suite.clients(admin())
    company = (await new_company(board_clients)).id
    agent = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    for _ in range(4):
        await _run_to_end(db, agent, issue)
    client = IssueClient(services.settings)
    try:
        assert await wake_breaker.announce_pending(db, client) >= 1
        assert await wake_breaker.announce_pending(db, client) == 0
    finally:
        await client.close()
    comments = await rows(
        db,
        "SELECT author_type, body FROM issues.issue_comments WHERE issue_id = :i",
        i=issue,
    )
    assert len(comments) == 1 and comments[0]["author_type"] == "system"
    assert "suspected wake loop" in comments[0]["body"]
    # A notice wakes nobody: no wake was written for the comment.
    woken = await rows(
        db,
        "SELECT count(*) AS n FROM runs.wakeup_requests WHERE agent_id = :a AND reason <> :r",
        a=agent,
        r=REASON,
    )
    assert woken[0]["n"] == 0


async def test_runs_queued_too_long_end_with_queue_timeout(
    db: Database, services: Services
) -> None:
    company = await seed_company(db)
    agent = await seed_agent(db, company)
    issue = await seed_issue(db, company)
    old = await wake(db, agent, issue_id=issue, reason="issue_assigned")
    young = await wake(db, agent, reason="on_demand")
    await rows(
        db,
        "UPDATE runs.heartbeat_runs SET created_at = now() - interval '5 hours'"
        " WHERE id = :r RETURNING id",
        r=old.run.id,
    )
    ended = await queue_age.expire_queued(db, services.runner, 4 * 3600)
    assert old.run.id in ended and young.run.id not in ended
    (run,) = await rows(
        db, "SELECT status, error_code FROM runs.heartbeat_runs WHERE id = :r", r=old.run.id
    )
    assert (run["status"], run["error_code"]) == ("failed", queue_age.ERROR_CODE)
    (wake_row,) = await rows(
        db, "SELECT status FROM runs.wakeup_requests WHERE id = :w", w=old.wakeup_request.id
    )
    assert wake_row["status"] == "failed"
    (event,) = await rows(
        db,
        "SELECT payload FROM runs.run_events WHERE run_id = :r AND message = 'run failed'",
        r=old.run.id,
    )
    assert event["payload"]["error_code"] == queue_age.ERROR_CODE
    (still,) = await rows(
        db, "SELECT status FROM runs.heartbeat_runs WHERE id = :r", r=young.run.id
    )
    assert still["status"] == "queued"
    assert await queue_age.expire_queued(db, services.runner, 0) == []
