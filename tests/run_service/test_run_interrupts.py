"""Outbox-driven cancellation: force-release and interrupt comments stop the holder's
run and kill its process (user-asks rows 2 and 26). Real sleeping agents, executed by
the session's runner."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import psutil
import pytest

from common.database_url import asyncpg_dsn
from common.db import Database
from common.sql import sql
from paperclip.issues.v1 import issues_pb2
from run_service.outbox import consume_forever
from run_service.run_interrupts import interrupt_once
from run_service.runner import Runner
from tests.conftest import Services
from tests.harness import Clients
from tests.run_service.test_runner import (
    agent_command,
    create_agent,
    issue_row,
    queue_run,
    run_events,
    run_row,
    wait_for,
)


@pytest.fixture
async def dispatched(runner: Runner, company_id: str) -> AsyncIterator[str]:
    assert runner.companies is not None
    runner.companies.add(company_id)
    yield company_id
    runner.companies.discard(company_id)


async def _holding_run(db: Database, owner: Clients, company: str) -> tuple[str, str, int]:
    """(issue, run, pid): a sleeping agent's run that holds the issue's execution lock."""
    agent = await create_agent(owner, company, agent_command("sleep.py", "60", "0.5"))
    issue = await owner.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company, title="held by a sleeper")
    )
    run_id = await queue_run(db, company_id=company, agent_id=agent, issue_id=issue.id)
    await wait_for(db, run_id, ("running",))
    deadline = time.monotonic() + 10
    while str((await issue_row(db, issue.id))["execution_run_id"]) != run_id:
        assert time.monotonic() < deadline, "the run never took the execution lock"
        await asyncio.sleep(0.05)
    while not (row := await run_row(db, run_id))["process_pid"]:
        assert time.monotonic() < deadline, "the process never started"
        await asyncio.sleep(0.05)
    return issue.id, run_id, int(row["process_pid"])


async def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_force_release_cancels_the_holder_and_kills_its_process(
    db: Database, runner: Runner, owner: Clients, dispatched: str
) -> None:
    issue, run_id, pid = await _holding_run(db, owner, dispatched)
    reply = await owner.issues.ForceReleaseIssue(
        issues_pb2.ForceReleaseIssueRequest(issue_id=issue)
    )
    assert reply.previous_execution_run_id == run_id
    await interrupt_once(db, runner)
    row = await wait_for(db, run_id, within=10)
    assert (row["status"], row["error_code"], row["error"]) == (
        "cancelled",
        "cancelled",
        "force-released by board",
    )
    assert await _gone(pid)
    assert (await run_events(db, run_id))[-1]["message"] == "run cancelled"
    # Idempotent: the event read again (lookback) changes nothing.
    await interrupt_once(db, runner)
    again = await run_row(db, run_id)
    assert (again["status"], again["finished_at"]) == ("cancelled", row["finished_at"])


async def test_interrupt_comment_cancels_the_executing_run(
    db: Database, runner: Runner, owner: Clients, dispatched: str
) -> None:
    issue, run_id, pid = await _holding_run(db, owner, dispatched)
    await owner.issues.AddComment(
        issues_pb2.AddCommentRequest(issue_id=issue, body="stop, please", interrupt=True)
    )
    await interrupt_once(db, runner)
    row = await wait_for(db, run_id, within=10)
    assert (row["status"], row["error"]) == ("cancelled", "interrupted by board comment")
    assert await _gone(pid)
    # The run's locks went with it.
    deadline = time.monotonic() + 5
    while (await issue_row(db, issue))["execution_run_id"] is not None:
        assert time.monotonic() < deadline, "the lock was not released"
        await asyncio.sleep(0.05)


async def test_force_release_of_a_queued_holder_cancels_it(
    db: Database, runner: Runner, owner: Clients, company_id: str
) -> None:
    """Not dispatched: the run stays queued and is cancelled without a process."""
    agent = await create_agent(owner, company_id, agent_command("succeed.py"))
    issue = await owner.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company_id, title="queued holder")
    )
    run_id = await queue_run(db, company_id=company_id, agent_id=agent, issue_id=issue.id)
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql("UPDATE issues.issues SET execution_run_id = :r WHERE id = :i"),
            {"r": run_id, "i": issue.id},
        )
    await owner.issues.ForceReleaseIssue(issues_pb2.ForceReleaseIssueRequest(issue_id=issue.id))
    await interrupt_once(db, runner)
    row = await run_row(db, run_id)
    assert (row["status"], row["error"]) == ("cancelled", "force-released by board")


async def test_the_outbox_consumer_runs_the_interrupt_pass(
    db: Database, services: Services
) -> None:
    calls = asyncio.Event()

    async def after_pass() -> None:
        calls.set()

    assert services.settings.database_url is not None
    task = asyncio.create_task(
        consume_forever(
            db,
            asyncpg_dsn(services.settings.database_url),
            poll_seconds=0.1,
            after_pass=after_pass,
        )
    )
    try:
        await asyncio.wait_for(calls.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
