"""Two run-service processes on one database (issue 4, "Concurrency").

The issue service and two run services run as separate processes (``python -m ...``,
the environment ``local_suite.launcher`` builds) on a database of their own; each run
service registers its own supervisor node. 200 issue-less runs (each with its own
wakeup row, as a non-coalesced wake writes them) are queued at once over 10 agents with
``max_concurrent_runs`` 5. The per-node process cap is set so that neither node can take
every agent slot alone and both together have more than enough: the per-agent limit is
what binds, and both dispatchers compete for the same agents. Sampled every 50 ms, no
agent ever has more than 5 ``running`` runs; in the end every run succeeded, started
exactly once, both nodes ran some, and after SIGTERM no agent process is left.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from common.db import Database
from common.sql import sql
from supervision import process_group
from tests.databases import fresh_database
from tests.e2e import service_processes
from tests.e2e.service_processes import ServiceProcesses, rows
from tests.harness import Suite, admin, new_company
from tests.run_service.test_runner import agent_command, create_agent

pytestmark = pytest.mark.e2e

AGENTS = 10
RUNS = 200
LIMIT = 5
#: Per node: below AGENTS * LIMIT (one node alone cannot fill every agent's slots),
#: above half of it (the two nodes together are never the bottleneck).
NODE_PROCESSES = 40
RUN_SECONDS = "0.4"
SAMPLE_SECONDS = 0.05
WITHIN_SECONDS = 45.0
MARKER = f"two-nodes-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
async def two_nodes_db_url(server_url: str) -> AsyncIterator[str]:
    """A database of this test alone: its run services dispatch every company."""
    async with fresh_database(server_url, "paperclip_two_nodes") as url:
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
def processes(two_nodes_db_url: str, tmp_path: Path) -> Iterator[ServiceProcesses]:
    running = ServiceProcesses(
        two_nodes_db_url,
        tmp_path,
        jwt_secret="two-nodes-test-jwt-secret-0123456789abcdef",
        PAPERCLIP_MAX_PROCESSES=str(NODE_PROCESSES),
    )
    try:
        yield running
    finally:
        running.stop()


async def test_two_run_services_never_exceed_the_agent_limit_and_run_each_run_once(
    two_nodes_db_url: str, processes: ServiceProcesses, leftovers: None
) -> None:
    db = Database(two_nodes_db_url, pool_size=5, max_overflow=5, name="two-nodes-test")
    try:
        await _scenario(db, processes)
    finally:
        await db.dispose()


async def _scenario(db: Database, processes: ServiceProcesses) -> None:
    issue_child = processes.start("issue_service", "PAPERCLIP_ISSUE_SERVICE_ADDR")
    nodes = [processes.start("run_service", "PAPERCLIP_RUN_SERVICE_ADDR") for _ in range(2)]
    node_ids = await _registered_nodes(db, [n.process.pid for n in nodes])

    suite = Suite(issue_addr=issue_child.addr, run_addr=nodes[0].addr, db=db)
    try:
        clients = suite.clients(admin())
        company = (await new_company(clients)).id
        agents = [
            await create_agent(
                clients,
                company,
                agent_command("sleep.py", RUN_SECONDS, "0", MARKER),
                max_concurrent_runs=LIMIT,
            )
            for _ in range(AGENTS)
        ]
    finally:
        await suite.close()

    started = time.monotonic()
    runs = await _queue_runs(db, company, [agents[i % AGENTS] for i in range(RUNS)])
    assert len(set(runs)) == RUNS
    most = await _sample_running(db, company, agents)
    elapsed = time.monotonic() - started
    assert max(most.values()) <= LIMIT, most
    # The limit was actually reached, so the sampling could have seen it exceeded.
    assert max(most.values()) == LIMIT, most

    done = await rows(
        db,
        """
        SELECT r.id, r.status, r.error, r.supervisor_node_id,
               (SELECT count(*) FROM runs.run_events e
                WHERE e.run_id = r.id AND e.type = 'lifecycle'
                  AND e.message = 'run started') AS starts,
               (SELECT count(*) FROM runs.run_events e
                WHERE e.run_id = r.id AND e.type = 'lifecycle'
                  AND e.message = 'run succeeded') AS ends,
               (SELECT status FROM runs.wakeup_requests w
                WHERE w.id = r.wakeup_request_id AND w.run_id = r.id) AS wake
        FROM runs.heartbeat_runs r WHERE r.company_id = :c
        """,
        c=company,
    )
    assert len(done) == RUNS  # nothing was retried or duplicated
    bad = [
        dict(r)
        for r in done
        if (r["status"], r["starts"], r["ends"], r["wake"]) != ("succeeded", 1, 1, "completed")
    ]
    assert not bad, bad[:5]
    per_node = dict.fromkeys(node_ids, 0)
    for r in done:
        node_id = str(r["supervisor_node_id"])
        assert node_id in per_node, f"run {r['id']} ran on an unknown node {node_id}"
        per_node[node_id] += 1
    assert all(n > 0 for n in per_node.values()), per_node

    # Both services stop on SIGTERM by themselves, leaving no agent process behind.
    for node in nodes:
        node.process.send_signal(signal.SIGTERM)
    for node in nodes:
        try:
            code = await asyncio.to_thread(node.process.wait, 15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"run service {node.process.pid} ignored SIGTERM") from None
        assert code == 0, process_group.describe_exit(code)
    assert not agent_processes()
    stopped = await rows(
        db,
        "SELECT id FROM runs.supervisor_nodes"
        " WHERE id = ANY(CAST(:ids AS uuid[])) AND stopped_at IS NOT NULL",
        ids=node_ids,
    )
    assert len(stopped) == 2
    assert elapsed < WITHIN_SECONDS


async def _registered_nodes(db: Database, pids: list[int]) -> list[str]:
    """The supervisor node ids of the run-service processes ``pids``, once each has
    registered one."""
    deadline = time.monotonic() + 15
    while True:
        found = await rows(
            db,
            "SELECT id, pid FROM runs.supervisor_nodes"
            " WHERE pid = ANY(CAST(:pids AS integer[])) AND stopped_at IS NULL",
            pids=pids,
        )
        if len(found) == len(pids):
            assert {r["pid"] for r in found} == set(pids)
            return [str(r["id"]) for r in found]
        assert time.monotonic() < deadline, f"nodes not registered: {[dict(r) for r in found]}"
        await asyncio.sleep(0.1)


async def _queue_runs(db: Database, company: str, agents: list[str]) -> list[str]:
    """One queued issue-less run per entry of ``agents``, each with its own queued wakeup
    row (as distinct, non-coalesced wakes write them), all in one transaction: both
    dispatchers see the whole queue at once."""
    async with db.unit_of_work() as tx:
        found = await tx.fetch(
            sql(
                """
                WITH wakes AS (
                    INSERT INTO runs.wakeup_requests
                        (company_id, agent_id, source, reason, status, idempotency_key)
                    SELECT CAST(:c AS uuid), a.agent, 'on_demand', 'concurrency', 'queued',
                           'two-nodes-' || a.n
                    FROM unnest(CAST(:agents AS uuid[])) WITH ORDINALITY AS a(agent, n)
                    RETURNING id, agent_id
                )
                INSERT INTO runs.heartbeat_runs
                    (company_id, agent_id, status, invocation_source, wake_reason,
                     wakeup_request_id)
                SELECT CAST(:c AS uuid), w.agent_id, 'queued', 'on_demand', 'concurrency', w.id
                FROM wakes w
                RETURNING id
                """
            ),
            {"c": company, "agents": agents},
        )
        # A statement's CTEs cannot see each other's rows: the back link in a second one.
        await tx.execute(
            sql(
                """
                UPDATE runs.wakeup_requests w SET run_id = r.id
                FROM runs.heartbeat_runs r
                WHERE r.wakeup_request_id = w.id AND r.company_id = CAST(:c AS uuid)
                """
            ),
            {"c": company},
        )
    return [str(r["id"]) for r in found]


async def _sample_running(db: Database, company: str, agents: list[str]) -> dict[str, int]:
    """Sample every agent's ``running`` count every 50 ms until no run of the company is
    queued or running; the maximum seen per agent."""
    most = dict.fromkeys(agents, 0)
    deadline = time.monotonic() + WITHIN_SECONDS
    while True:
        found = await rows(
            db,
            """
            SELECT agent_id, count(*) FILTER (WHERE status = 'running') AS running,
                   count(*) FILTER (WHERE status IN ('queued', 'running')) AS active
            FROM runs.heartbeat_runs WHERE company_id = :c GROUP BY agent_id
            """,
            c=company,
        )
        for row in found:
            key = str(row["agent_id"])
            most[key] = max(most[key], int(row["running"]))
        if all(int(row["active"]) == 0 for row in found):
            return most
        assert time.monotonic() < deadline, f"runs did not finish in time; most: {most}"
        await asyncio.sleep(SAMPLE_SECONDS)
