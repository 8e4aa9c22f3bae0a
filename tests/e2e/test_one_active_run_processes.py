"""One active run per (agent, issue) across two run-service processes.

An issue service and two run services run as separate processes on a database of
their own. An agent assigned an issue is woken for it 40 times at once, half of the
wakes sent to each run service, while its runs execute (each sleeps 0.5 s). Sampled
every 20 ms, the pair never has more than one queued or running run; in the end every
wake was queued, coalesced or promoted (none left waiting), and every run succeeded
having started exactly once.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from common.db import Database
from paperclip.issues.v1 import issues_pb2
from paperclip.runs.v1 import run_messages_pb2, runs_pb2
from tests.databases import fresh_database
from tests.e2e import service_processes
from tests.e2e.service_processes import ServiceProcesses, rows, settled
from tests.harness import Suite, admin, new_company
from tests.run_service.test_runner import agent_command, create_agent

pytestmark = pytest.mark.e2e

WAKES = 40
MARKER = f"one-active-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
async def one_active_db_url(server_url: str) -> AsyncIterator[str]:
    async with fresh_database(server_url, "paperclip_one_active_e2e") as url:
        yield url


@pytest.fixture
def processes(one_active_db_url: str, tmp_path: Path) -> Iterator[ServiceProcesses]:
    # The wake-loop breaker off: 40 wakes of one reason may start more than its 10 runs
    # (it has tests of its own); here every wake must be queued, merged or deferred.
    running = ServiceProcesses(
        one_active_db_url,
        tmp_path,
        jwt_secret="one-active-test-jwt-secret-0123456789abcdef",
        PAPERCLIP_WAKE_LOOP_RUNS="0",
    )
    try:
        yield running
    finally:
        running.stop()
        service_processes.kill_agents(MARKER)


async def test_two_run_services_keep_one_active_run_per_agent_and_issue(
    one_active_db_url: str, processes: ServiceProcesses
) -> None:
    db = Database(one_active_db_url, pool_size=5, max_overflow=5, name="one-active-test")
    issue_child = processes.start("issue_service", "PAPERCLIP_ISSUE_SERVICE_ADDR")
    nodes = [processes.start("run_service", "PAPERCLIP_RUN_SERVICE_ADDR") for _ in range(2)]
    suites = [Suite(issue_addr=issue_child.addr, run_addr=n.addr, db=db) for n in nodes]
    try:
        clients = [s.clients(admin()) for s in suites]
        company = (await new_company(clients[0])).id
        agent = await create_agent(
            clients[0], company, agent_command("sleep.py", "0.5", "0", MARKER)
        )
        issue = await clients[0].issues.CreateIssue(
            issues_pb2.CreateIssueRequest(
                company_id=company,
                title="Contended",
                assignee_agent_id=agent,
                status=issues_pb2.ISSUE_STATUS_TODO,
            )
        )
        stop = asyncio.Event()
        most = [0]
        sampler = asyncio.create_task(_sample(db, agent, issue.id, most, stop))

        async def wake(index: int) -> runs_pb2.WakeAgentResponse:
            return await clients[index % 2].runs.WakeAgent(
                runs_pb2.WakeAgentRequest(
                    agent_id=agent,
                    source=run_messages_pb2.WAKE_SOURCE_ON_DEMAND,
                    reason="contended",
                    issue_id=issue.id,
                )
            )

        answers = await asyncio.gather(*(wake(i) for i in range(WAKES)))
        await settled(db, column="agent_id", value=agent, within=60)
        stop.set()
        await sampler
    finally:
        for s in suites:
            await s.close()
        await db.dispose()

    assert most[0] == 1, most
    statuses = Counter(a.wakeup_request.status for a in answers)
    assert set(statuses) <= {
        run_messages_pb2.WAKEUP_STATUS_QUEUED,
        run_messages_pb2.WAKEUP_STATUS_COALESCED,
        run_messages_pb2.WAKEUP_STATUS_DEFERRED,
    }, statuses
    done = await _runs(one_active_db_url, agent)
    assert done, "no run was made"
    assert all(r["status"] == "succeeded" and r["starts"] == 1 for r in done), done


async def _sample(
    db: Database, agent: str, issue: str, most: list[int], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        found = await rows(
            db,
            "SELECT count(*) AS n FROM runs.heartbeat_runs WHERE agent_id = :a"
            " AND issue_id = :i AND status IN ('queued', 'running')",
            a=agent,
            i=issue,
        )
        most[0] = max(most[0], int(found[0]["n"]))
        await asyncio.sleep(0.02)


async def _runs(url: str, agent: str) -> list[dict[str, object]]:
    db = Database(url, pool_size=1, max_overflow=0, name="one-active-check")
    try:
        found = await rows(
            db,
            """
            SELECT r.id, r.status,
                   (SELECT count(*) FROM runs.run_events e
                    WHERE e.run_id = r.id AND e.message = 'run started') AS starts
            FROM runs.heartbeat_runs r WHERE r.agent_id = :a
            """,
            a=agent,
        )
        return [dict(r) for r in found]
    finally:
        await db.dispose()
