"""SIGKILL the run service while 20 agents run, start it again (issue 4, "Faults").

The issue service and the run service run as separate processes (``python -m ...``, the
environment ``local_suite.launcher`` builds) on a database of their own. 20 runs of silent
``sleep.py`` agents (4 agents x 5) run, each on its own issue (so each holds an
execution lock); the run service is SIGKILLed; 5 of the agents are killed while it is
down; it is started again. Then:

- every run whose process survived is adopted (``running``, ``process_detached``, the
  new node); every run whose process died is ``process_lost`` with exactly one retry,
  which holds the issue's lock;
- every agent process belongs to a running run;
- after cancelling everything through the RPC, no agent process is left and every issue
  lock is consistent (null, or a live run's).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from common.db import Database
from common.sql import Row
from paperclip.issues.v1 import issues_pb2
from paperclip.runs.v1 import run_messages_pb2 as pb
from paperclip.runs.v1 import runs_pb2
from tests.databases import fresh_database
from tests.e2e import service_processes
from tests.e2e.service_processes import ServiceProcesses, rows
from tests.harness import Clients, Suite, admin, new_company
from tests.run_service.test_runner import agent_command, create_agent, queue_run

pytestmark = pytest.mark.e2e

RUNS = 20
AGENTS = 4
KILLED = 5
MARKER = f"crash-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
async def crash_db_url(server_url: str) -> AsyncIterator[str]:
    """A database of this test alone: the run service here dispatches every company."""
    async with fresh_database(server_url, "paperclip_crash") as url:
        yield url


def agent_processes() -> list[psutil.Process]:
    """The agent processes of this test (their command line carries MARKER)."""
    return service_processes.agent_processes(MARKER)


@pytest.fixture
def leftovers() -> Iterator[None]:
    """Kill this test's agent processes, whatever happens."""
    yield
    service_processes.kill_agents(MARKER)


@pytest.fixture
def services(crash_db_url: str, tmp_path: Path) -> Iterator[ServiceProcesses]:
    running = ServiceProcesses(
        crash_db_url, tmp_path, jwt_secret="crash-test-jwt-secret-0123456789abcdef"
    )
    try:
        yield running
    finally:
        running.stop()


async def wait_until(check: object, *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while True:
        assert callable(check)
        if await check():
            return
        assert time.monotonic() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.1)


async def test_sigkill_run_service_then_restart_adopts_or_retries_every_run(
    crash_db_url: str, services: ServiceProcesses, leftovers: None
) -> None:
    db = Database(crash_db_url, pool_size=5, max_overflow=5, name="crash-test")
    try:
        await _scenario(db, services)
    finally:
        await db.dispose()


async def _scenario(db: Database, services: ServiceProcesses) -> None:
    issue_child = services.start("issue_service", "PAPERCLIP_ISSUE_SERVICE_ADDR")
    run_child = services.start("run_service", "PAPERCLIP_RUN_SERVICE_ADDR")
    suite = Suite(issue_addr=issue_child.addr, run_addr=run_child.addr, db=db)
    clients = suite.clients(admin())
    company = (await new_company(clients)).id
    agents = [
        await create_agent(clients, company, agent_command("sleep.py", "20", "0", MARKER))
        for _ in range(AGENTS)
    ]
    runs: list[str] = []
    for i in range(RUNS):
        issue = await clients.issues.CreateIssue(
            issues_pb2.CreateIssueRequest(company_id=company, title=f"crash {i}")
        )
        runs.append(
            await queue_run(db, company_id=company, agent_id=agents[i % AGENTS], issue_id=issue.id)
        )

    async def all_spawned() -> bool:
        found = await rows(
            db,
            "SELECT count(*) AS n FROM runs.heartbeat_runs WHERE company_id = :c"
            " AND status = 'running' AND process_pid IS NOT NULL",
            c=company,
        )
        return int(found[0]["n"]) == RUNS

    await wait_until(all_spawned, within=30, what="20 runs running")
    await suite.close()
    before = {
        str(r["id"]): r
        for r in await rows(
            db, "SELECT * FROM runs.heartbeat_runs WHERE company_id = :c", c=company
        )
    }
    old_node = {str(r["supervisor_node_id"]) for r in before.values()}
    assert len(old_node) == 1

    # The crash: no shutdown code runs. Agents live on in their own sessions.
    run_child.process.send_signal(signal.SIGKILL)
    run_child.process.wait()
    assert len(agent_processes()) == RUNS
    # Some agents die while nobody supervises them.
    killed = sorted(before)[:KILLED]
    for run_id in killed:
        psutil.Process(before[run_id]["process_pid"]).kill()
    for run_id in killed:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(before[run_id]["process_pid"]).wait(timeout=5)

    restarted = time.monotonic()
    run_child = services.start("run_service", "PAPERCLIP_RUN_SERVICE_ADDR")
    suite = Suite(issue_addr=issue_child.addr, run_addr=run_child.addr, db=db)
    clients = suite.clients(admin())
    try:
        await _after_restart(
            db,
            clients,
            company,
            before=before,
            killed=killed,
            old_node=old_node.pop(),
            restarted=restarted,
        )
    finally:
        await suite.close()


async def _after_restart(
    db: Database,
    clients: Clients,
    company: str,
    *,
    before: dict[str, Row],
    killed: list[str],
    old_node: str,
    restarted: float,
) -> None:
    async def recovered() -> bool:
        # A lost run is claimed (moved off the old node) before its process_lost write
        # and retry commit: recovered means both, no run left on the old node and one
        # retry of each lost run.
        found = await rows(
            db,
            "SELECT"
            " (SELECT count(*) FROM runs.heartbeat_runs WHERE company_id = :c"
            "  AND id = ANY(CAST(:ids AS uuid[])) AND status = 'running'"
            "  AND supervisor_node_id = CAST(:old AS uuid)) AS on_old_node,"
            " (SELECT count(*) FROM runs.heartbeat_runs WHERE company_id = :c"
            "  AND retry_of_run_id = ANY(CAST(:killed AS uuid[]))) AS retried",
            c=company,
            ids=list(before),
            old=old_node,
            killed=killed,
        )
        return int(found[0]["on_old_node"]) == 0 and int(found[0]["retried"]) >= KILLED

    await wait_until(recovered, within=20, what="the restarted node recovered every run")
    # The boot pass does not wait for the dead node's lease (15 s) to expire.
    assert time.monotonic() - restarted < 12

    after = {
        str(r["id"]): r
        for r in await rows(
            db, "SELECT * FROM runs.heartbeat_runs WHERE company_id = :c", c=company
        )
    }
    retries = {str(r["retry_of_run_id"]): r for r in after.values() if r["retry_of_run_id"]}
    assert len(after) == len(before) + KILLED  # one retry per lost run, nothing else
    for run_id, row in ((k, after[k]) for k in before):
        if run_id in killed:
            assert (row["status"], row["error_code"]) == ("failed", "process_lost"), dict(row)
            retry = retries[run_id]
            assert retry["process_loss_retry_count"] == 1
            assert retry["issue_id"] == row["issue_id"]
        else:
            assert (row["status"], row["error_code"]) == ("running", "process_detached"), dict(row)
            assert str(row["supervisor_node_id"]) != old_node
            assert row["process_pid"] == before[run_id]["process_pid"]
    assert set(retries) == set(killed)

    async def retries_running() -> bool:
        found = await rows(
            db,
            "SELECT count(*) AS n FROM runs.heartbeat_runs WHERE company_id = :c"
            " AND retry_of_run_id IS NOT NULL AND status = 'running'"
            " AND process_pid IS NOT NULL",
            c=company,
        )
        return int(found[0]["n"]) == KILLED

    await wait_until(retries_running, within=20, what="the retries started")

    # Every agent process belongs to a running run; every running run has its process.
    running = await rows(
        db,
        "SELECT process_pid FROM runs.heartbeat_runs WHERE company_id = :c AND status = 'running'",
        c=company,
    )
    assert sorted(p.pid for p in agent_processes()) == sorted(r["process_pid"] for r in running)
    await _assert_locks_consistent(db, company)

    # Cancel everything through the RPC.
    active = await rows(
        db,
        "SELECT id FROM runs.heartbeat_runs WHERE company_id = :c"
        " AND status IN ('queued', 'running')",
        c=company,
    )
    replies = await asyncio.gather(
        *(
            clients.runs.CancelRun(runs_pb2.CancelRunRequest(run_id=str(r["id"]), reason="done"))
            for r in active
        )
    )
    assert all(reply.status == pb.RUN_STATUS_CANCELLED for reply in replies)

    async def no_agents_left() -> bool:
        return not agent_processes()

    await wait_until(no_agents_left, within=10, what="every agent process ended")

    async def locks_cleared() -> bool:
        held = await rows(
            db,
            "SELECT count(*) AS n FROM issues.issues WHERE company_id = :c"
            " AND (execution_run_id IS NOT NULL OR checkout_run_id IS NOT NULL)",
            c=company,
        )
        return int(held[0]["n"]) == 0

    await wait_until(locks_cleared, within=10, what="every issue lock released")
    await _assert_locks_consistent(db, company)


async def _assert_locks_consistent(db: Database, company: str) -> None:
    """Every issue lock is null or held by a live (queued / running) run."""
    stale = await rows(
        db,
        """
        SELECT i.id, i.execution_run_id, r.status FROM issues.issues i
        LEFT JOIN runs.heartbeat_runs r ON r.id = i.execution_run_id
        WHERE i.company_id = :c AND i.execution_run_id IS NOT NULL
          AND (r.id IS NULL OR r.status NOT IN ('queued', 'running'))
        """,
        c=company,
    )
    assert not stale, [dict(r) for r in stale]
