"""End to end through a real gateway: an agent process does its issue's work.

The session's issue and run services (in-process, real sockets) and a gateway on port 0
in front of them; the run service's runner starts the agent ``tests/agents/worker.py``
with a run token and ``PAPERCLIP_API_URL`` pointing at the gateway. The agent checks the
issue out, comments, moves it to done and exits; the run ends, its locks and its token
die with it.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from paperclip_client import PaperclipClient

from common.actor import Role
from common.config import load_settings
from common.db import Database
from common.errors import Unauthenticated
from common.run_tokens import mint_run_token
from gateway.app import start_gateway
from paperclip.issues.v1 import issues_pb2
from run_service.runner import Runner
from tests.conftest import Services
from tests.gateway.conftest import wait_serving
from tests.harness import INTERNAL_KEY, admin, board, new_company
from tests.run_service.test_runner import (
    AGENTS,
    create_agent,
    issue_row,
    queue_run,
    run_events,
    wait_for,
)


@pytest.fixture
async def gateway_addr(services: Services, runner: Runner, database_url: str) -> AsyncIterator[str]:
    """A gateway routing to the session's services, with the run service's JWT secret;
    the runner hands its address to the agents it starts while the test runs."""
    settings = load_settings(
        {
            "PAPERCLIP_HOME": tempfile.mkdtemp(prefix="paperclip-e2e-gateway-"),
            "PAPERCLIP_DATABASE_URL": database_url,
            "PAPERCLIP_INTERNAL_KEY": INTERNAL_KEY.decode(),
            "PAPERCLIP_JWT_SECRET": services.settings.jwt_secret.decode(),
        }
    )
    gateway_db = Database(database_url, pool_size=5, max_overflow=5, name="gateway")
    gateway = await start_gateway(
        gateway_db,
        settings,
        address="127.0.0.1:0",
        backends=services.suite.backends(),
    )
    address = f"127.0.0.1:{gateway.running.port}"
    previous = runner.settings
    runner.settings = replace(previous, gateway_addr=address)
    try:
        await wait_serving(address)
        yield address
    finally:
        runner.settings = previous
        await gateway.stop(0.5)
        await gateway_db.dispose()


async def test_agent_checks_out_comments_and_finishes_through_the_gateway(
    services: Services, runner: Runner, gateway_addr: str
) -> None:
    suite = services.suite
    db = suite.db
    company = (await new_company(suite.clients(admin()))).id
    owner = suite.clients(board(company, Role.ADMIN, user_id="owner"))
    agent = await create_agent(owner, company, [sys.executable, str(AGENTS / "worker.py")])
    issue = await owner.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(
            company_id=company,
            title="do the work",
            status=issues_pb2.ISSUE_STATUS_TODO,
            assignee_agent_id=agent,
        )
    )
    assert runner.companies is not None
    runner.companies.add(company)
    try:
        run_id = await queue_run(
            db, company_id=company, agent_id=agent, issue_id=issue.id, reason="issue_assigned"
        )
        row = await wait_for(db, run_id, within=30)
    finally:
        runner.companies.discard(company)
    events = await run_events(db, run_id)
    assert row["status"] == "succeeded", (row["error"], [e["message"] for e in events])
    messages = [e["message"].strip() for e in events]
    assert messages[0] == "run started" and messages[-1] == "run succeeded"
    assert "issue checked out for the run" in messages  # the harness checkout
    assert any(m.startswith("checked out ") for m in messages) and "moved to done" in messages

    done = await owner.issues.GetIssue(issues_pb2.GetIssueRequest(issue=issue.id))
    assert done.status == issues_pb2.ISSUE_STATUS_DONE
    assert done.assignee_agent_id == agent
    comments = await owner.issues.ListComments(issues_pb2.ListCommentsRequest(issue_id=issue.id))
    assert [c.body for c in comments.comments] == ["worker: done the work"]
    deadline = time.monotonic() + 5
    while True:  # ReleaseRunLocks follows the terminal commit
        locks = await issue_row(db, issue.id)
        if locks["execution_run_id"] is None and locks["checkout_run_id"] is None:
            break
        assert time.monotonic() < deadline, dict(locks)
        await asyncio.sleep(0.05)

    token = mint_run_token(
        services.settings.jwt_secret, agent_id=agent, company_id=company, run_id=run_id
    )
    async with PaperclipClient(gateway_addr, token) as client:
        with pytest.raises(Unauthenticated) as refused:
            await client.issues.GetIssue(issues_pb2.GetIssueRequest(issue=issue.id))
    assert refused.value.reason == "RUN_TOKEN_REVOKED"
