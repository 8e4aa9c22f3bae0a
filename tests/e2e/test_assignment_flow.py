"""Issue 4's flow end to end on ``make run``'s processes, through the gateway only:
assign an issue to an agent -> the outbox wakes it -> a run starts the agent as a child
process with a run token -> the agent checks the issue out, comments and moves it to
done -> the run succeeds -> the issue's locks are cleared -> the token is refused."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from paperclip_client import PaperclipClient

from common.errors import Unauthenticated
from common.run_tokens import mint_run_token
from paperclip.gateway.v1 import auth_pb2
from paperclip.issues.v1 import issues_pb2
from paperclip.runs.v1 import agents_pb2, run_messages_pb2, runs_pb2
from tests.e2e.test_operator_flow import Launcher, _free_port
from tests.harness import unique_prefix

pytestmark = pytest.mark.e2e

WORKER = str(Path(__file__).resolve().parents[1] / "agents" / "worker.py")


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    home = tmp_path_factory.mktemp("assignment-home")
    suite = Launcher(home, f"127.0.0.1:{_free_port()}", home / "launcher.log")
    suite.wait_ready()
    yield suite
    suite.kill()


async def _wait_for_run(client: PaperclipClient, company: str, issue: str) -> run_messages_pb2.Run:
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        page = await client.runs.ListRuns(
            runs_pb2.ListRunsRequest(company_id=company, issue_id=issue)
        )
        finished = [r for r in page.runs if r.status >= run_messages_pb2.RUN_STATUS_SUCCEEDED]
        if finished:
            return finished[0]
        await asyncio.sleep(0.2)
    raise AssertionError("no run of the assigned issue finished in time")


async def test_assignment_wakes_the_agent_which_finishes_the_issue(launcher: Launcher) -> None:
    token = (launcher.home / "board-token").read_text().strip()
    secrets = json.loads((launcher.home / "secrets.json").read_text())
    async with PaperclipClient(launcher.gateway, token) as board:
        company = await board.issues.CreateCompany(
            issues_pb2.CreateCompanyRequest(name="Assign", issue_prefix=unique_prefix())
        )
        agent = await board.runs.CreateAgent(
            agents_pb2.CreateAgentRequest(
                company_id=company.id,
                name="worker",
                adapter_type="process",
                adapter_config=agents_pb2.AdapterConfig(command=[sys.executable, WORKER]),
                runtime_config=agents_pb2.RuntimeConfig(timeout_seconds=60, grace_seconds=2),
            )
        )
        issue = await board.issues.CreateIssue(
            issues_pb2.CreateIssueRequest(
                company_id=company.id,
                title="do the work",
                status=issues_pb2.ISSUE_STATUS_TODO,
                assignee_agent_id=agent.id,
            )
        )

        run = await _wait_for_run(board, company.id, issue.id)
        assert run.status == run_messages_pb2.RUN_STATUS_SUCCEEDED, run
        assert run.wake_reason == "issue_assigned"
        assert run.process_pid > 0 and run.exit_code == 0

        done = await board.issues.GetIssue(issues_pb2.GetIssueRequest(issue=issue.id))
        assert done.status == issues_pb2.ISSUE_STATUS_DONE
        assert not done.checkout_run_id and not done.execution_run_id
        comments = await board.issues.ListComments(
            issues_pb2.ListCommentsRequest(issue_id=issue.id)
        )
        assert [c.body for c in comments.comments] == ["worker: done the work"]
        assert comments.comments[0].created_by_run_id == run.id
        events = await board.runs.ListRunEvents(runs_pb2.ListRunEventsRequest(run_id=run.id))
        assert any("moved to done" in e.message for e in events.events)

        # One assignment, one run: the agent's own writes woke nobody.
        runs = await board.runs.ListRuns(runs_pb2.ListRunsRequest(company_id=company.id))
        assert [r.id for r in runs.runs] == [run.id]

    agent_token = mint_run_token(
        secrets["jwt_secret"].encode(), agent_id=agent.id, company_id=company.id, run_id=run.id
    )
    async with PaperclipClient(launcher.gateway, agent_token) as finished_agent:
        with pytest.raises(Unauthenticated) as refused:
            await finished_agent.auth.WhoAmI(auth_pb2.WhoAmIRequest())
    assert refused.value.reason == "RUN_TOKEN_REVOKED"
