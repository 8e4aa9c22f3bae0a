"""The runner: dispatch, supervision and the terminal write, with real agent processes.

Runs are queued straight in the database (a wake row and a queued run, as a wake would
write them) for agents whose command is one of ``tests/agents``; the session's runner
(or, for the two-node test, two more runners) executes them.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from common.actor import Role
from common.config import Settings
from common.db import Database
from common.run_tokens import verify_run_token
from common.sql import Row, sql
from paperclip.issues.v1 import issues_pb2
from paperclip.runs.v1 import agents_pb2
from run_service.runner import Runner
from tests.conftest import Services
from tests.harness import Clients, Suite, admin, board, new_company

AGENTS = Path(__file__).resolve().parents[1] / "agents"
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out")


def agent_command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(AGENTS / script), *args]


async def create_agent(
    clients: Clients,
    company_id: str,
    command: list[str],
    *,
    env: Mapping[str, str] | None = None,
    **runtime: int,
) -> str:
    """A process agent (grace 1 s unless given); its id."""
    runtime.setdefault("grace_seconds", 1)
    config: dict[str, Any] = dict(runtime)
    agent = await clients.runs.CreateAgent(
        agents_pb2.CreateAgentRequest(
            company_id=company_id,
            name=f"agent-{uuid.uuid4().hex[:8]}",
            role="engineer",
            adapter_type="process",
            adapter_config=agents_pb2.AdapterConfig(command=command, env=dict(env or {})),
            runtime_config=agents_pb2.RuntimeConfig(**config),
        )
    )
    return agent.id


async def queue_run(
    db: Database,
    *,
    company_id: str,
    agent_id: str,
    issue_id: str | None = None,
    reason: str = "test",
) -> str:
    """A queued wake and its queued run, as WakeAgent writes them; the run id."""
    async with db.unit_of_work() as tx:
        wake = await tx.fetchval(
            sql(
                """
                INSERT INTO runs.wakeup_requests
                    (company_id, agent_id, source, reason, issue_id, status)
                VALUES (:c, :a, 'on_demand', :r, :i, 'queued') RETURNING id
                """
            ),
            {"c": company_id, "a": agent_id, "r": reason, "i": issue_id},
        )
        run = await tx.fetchval(
            sql(
                """
                INSERT INTO runs.heartbeat_runs
                    (company_id, agent_id, issue_id, status, invocation_source, wake_reason,
                     wakeup_request_id)
                VALUES (:c, :a, :i, 'queued', 'on_demand', :r, :w) RETURNING id
                """
            ),
            {"c": company_id, "a": agent_id, "i": issue_id, "r": reason, "w": wake},
        )
        await tx.execute(
            sql("UPDATE runs.wakeup_requests SET run_id = :r WHERE id = :w"),
            {"r": run, "w": wake},
        )
    return str(run)


async def run_row(db: Database, run_id: str) -> Row:
    async with db.unit_of_work() as tx:
        row = await tx.fetchrow(
            sql("SELECT * FROM runs.heartbeat_runs WHERE id = :id"), {"id": run_id}
        )
    assert row is not None
    return row


async def run_events(db: Database, run_id: str) -> list[Row]:
    async with db.unit_of_work() as tx:
        return await tx.fetch(
            sql("SELECT * FROM runs.run_events WHERE run_id = :id ORDER BY seq"), {"id": run_id}
        )


async def wait_for(
    db: Database, run_id: str, statuses: tuple[str, ...] = TERMINAL, *, within: float = 20.0
) -> Row:
    """The run row once its status is one of ``statuses``."""
    deadline = time.monotonic() + within
    while True:
        row = await run_row(db, run_id)
        if row["status"] in statuses:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {row['status']} after {within} s")
        await asyncio.sleep(0.05)


async def issue_row(db: Database, issue_id: str) -> Row:
    async with db.unit_of_work() as tx:
        row = await tx.fetchrow(sql("SELECT * FROM issues.issues WHERE id = :id"), {"id": issue_id})
    assert row is not None
    return row


def payload(event: Row) -> dict[str, Any]:
    value = event["payload"]
    return json.loads(value) if isinstance(value, str) else dict(value)


@pytest.fixture
async def owner(suite: Suite) -> AsyncIterator[tuple[Clients, str]]:
    """(clients of an admin member, company id) of a fresh company."""
    company = await new_company(suite.clients(admin()))
    yield suite.clients(board(company.id, Role.ADMIN, user_id="owner")), company.id


@pytest.fixture
async def dispatched(runner: Runner, owner: tuple[Clients, str]) -> AsyncIterator[str]:
    """The company of ``owner``, dispatched by the session's runner during the test."""
    _, company_id = owner
    assert runner.companies is not None
    runner.companies.add(company_id)
    yield company_id
    runner.companies.discard(company_id)


async def test_succeeding_agent_records_identity_and_events_in_order(
    runner: Runner, db: Database, owner: tuple[Clients, str], dispatched: str
) -> None:
    clients, company = owner
    agent = await create_agent(clients, company, agent_command("succeed.py"))
    run_id = await queue_run(db, company_id=company, agent_id=agent)
    row = await wait_for(db, run_id)
    assert (row["status"], row["exit_code"], row["error_code"]) == ("succeeded", 0, None)
    assert row["process_pid"] and row["process_group_id"] == row["process_pid"]
    assert row["process_started_at"] is not None and row["started_at"] is not None
    assert str(row["supervisor_node_id"]) == runner.node_id
    assert row["finished_at"] is not None and row["stdout_bytes"] > 0
    assert (row["grace_seconds"], row["timeout_seconds"]) == (1, 7200)
    events = await run_events(db, run_id)
    assert [(e["type"], e["message"].strip()) for e in events] == [
        ("lifecycle", "run started"),
        ("stdout", "hello from succeed"),
        ("lifecycle", "run succeeded"),
    ]
    assert payload(events[-1]) == {"terminal": True, "status": "succeeded", "exit_code": 0}
    async with db.unit_of_work() as tx:
        wake = await tx.fetchval(
            sql("SELECT status FROM runs.wakeup_requests WHERE run_id = :r"), {"r": run_id}
        )
        state = await tx.fetchrow(
            sql("SELECT * FROM runs.agent_runtime_state WHERE agent_id = :a"), {"a": agent}
        )
    assert wake == "completed"
    assert state is not None and (str(state["last_run_id"]), state["last_run_status"]) == (
        run_id,
        "succeeded",
    )


async def test_failing_agent_is_adapter_failed_with_its_exit_code(
    db: Database, owner: tuple[Clients, str], dispatched: str
) -> None:
    clients, company = owner
    agent = await create_agent(clients, company, agent_command("fail.py"))
    run_id = await queue_run(db, company_id=company, agent_id=agent)
    row = await wait_for(db, run_id)
    assert (row["status"], row["error_code"], row["exit_code"]) == ("failed", "adapter_failed", 3)
    events = await run_events(db, run_id)
    assert ("stderr", "failing on purpose") in [(e["type"], e["message"].strip()) for e in events]
    assert events[-1]["message"] == "run failed" and payload(events[-1])["terminal"] is True


async def test_missing_program_fails_the_run(
    db: Database, owner: tuple[Clients, str], dispatched: str
) -> None:
    clients, company = owner
    agent = await create_agent(clients, company, ["/nonexistent/agent-program"])
    row = await wait_for(db, await queue_run(db, company_id=company, agent_id=agent))
    assert (row["status"], row["error_code"]) == ("failed", "adapter_failed")
    assert "Failed to start command" in row["error"] and row["process_pid"] is None


async def test_wall_clock_timeout_kills_the_agent(
    db: Database, owner: tuple[Clients, str], dispatched: str
) -> None:
    clients, company = owner
    agent = await create_agent(
        clients, company, agent_command("sleep.py", "30", "0.2"), timeout_seconds=1
    )
    run_id = await queue_run(db, company_id=company, agent_id=agent)
    row = await wait_for(db, run_id)
    assert (row["status"], row["error_code"]) == ("timed_out", "timeout")
    assert not psutil.pid_exists(row["process_pid"]) or (
        psutil.Process(row["process_pid"]).status() == psutil.STATUS_ZOMBIE
    )


async def test_cancel_kills_the_whole_tree(
    runner: Runner, db: Database, owner: tuple[Clients, str], dispatched: str
) -> None:
    clients, company = owner
    agent = await create_agent(clients, company, agent_command("grandchildren.py"))
    run_id = await queue_run(db, company_id=company, agent_id=agent)
    await wait_for(db, run_id, ("running",))
    deadline = time.monotonic() + 10
    pids: dict[str, int] = {}
    while not pids:
        stdout = [e for e in await run_events(db, run_id) if e["type"] == "stdout"]
        if stdout:
            pids = json.loads(stdout[0]["message"])
        assert time.monotonic() < deadline, "the agent never printed its grandchildren"
        await asyncio.sleep(0.05)
    procs = [psutil.Process(pid) for pid in pids.values()]
    assert await runner.cancel(run_id, "test cancel")
    row = await wait_for(db, run_id)
    assert (row["status"], row["error_code"], row["error"]) == (
        "cancelled",
        "cancelled",
        "test cancel",
    )
    _, alive = await asyncio.to_thread(psutil.wait_procs, procs, timeout=3)
    assert not alive, f"left behind: {alive}"
    assert not await runner.cancel(run_id, "again")  # no longer supervised here
    events = await run_events(db, run_id)
    assert events[-1]["message"] == "run cancelled"


async def test_issue_run_holds_the_execution_lock_while_running(
    suite: Suite, db: Database, owner: tuple[Clients, str], dispatched: str
) -> None:
    clients, company = owner
    agent = await create_agent(clients, company, agent_command("sleep.py", "1", "0.2"))
    issue = await clients.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company, title="locked while running")
    )
    run_id = await queue_run(db, company_id=company, agent_id=agent, issue_id=issue.id)
    await wait_for(db, run_id, ("running",))
    deadline = time.monotonic() + 5
    while str((await issue_row(db, issue.id))["execution_run_id"]) != run_id:
        assert time.monotonic() < deadline, "the run never took the execution lock"
        await asyncio.sleep(0.05)
    assert (await wait_for(db, run_id))["status"] == "succeeded"
    deadline = time.monotonic() + 5
    while (await issue_row(db, issue.id))["execution_run_id"] is not None:
        assert time.monotonic() < deadline, "the lock was not released"
        await asyncio.sleep(0.05)


async def test_run_on_a_locked_issue_stays_queued_until_the_holder_ends(
    db: Database, owner: tuple[Clients, str], dispatched: str
) -> None:
    clients, company = owner
    first_agent = await create_agent(clients, company, agent_command("sleep.py", "1.5", "0.2"))
    second_agent = await create_agent(clients, company, agent_command("succeed.py"))
    issue = await clients.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company, title="one run at a time")
    )
    first = await queue_run(db, company_id=company, agent_id=first_agent, issue_id=issue.id)
    await wait_for(db, first, ("running",))
    deadline = time.monotonic() + 5
    while str((await issue_row(db, issue.id))["execution_run_id"]) != first:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    second = await queue_run(db, company_id=company, agent_id=second_agent, issue_id=issue.id)
    while (await run_row(db, first))["status"] == "running":
        row = await run_row(db, second)
        assert row["status"] == "queued" and row["process_pid"] is None, dict(row)
        await asyncio.sleep(0.05)
    assert (await run_row(db, first))["status"] == "succeeded"
    row = await wait_for(db, second)
    assert row["status"] == "succeeded"
    assert row["started_at"] >= (await run_row(db, first))["finished_at"]
    assert len([e for e in await run_events(db, second) if e["message"] == "run started"]) == 1


async def test_agent_environment_is_minimal_and_paperclip_variables_win(
    services: Services, db: Database, owner: tuple[Clients, str], dispatched: str
) -> None:
    clients, company = owner
    agent = await create_agent(
        clients, company, agent_command("env_dump.py"), env={"AGENT_SETTING": "configured"}
    )
    # The API refuses PAPERCLIP_* keys; a row written otherwise must not win either.
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql(
                """
                UPDATE runs.agents SET adapter_config = jsonb_set(adapter_config, '{env}',
                    CAST(:env AS jsonb)) WHERE id = :a
                """
            ),
            {
                "a": agent,
                "env": json.dumps(
                    {
                        "AGENT_SETTING": "configured",
                        "PAPERCLIP_RUN_ID": "forged",
                        "PAPERCLIP_AGENT_TOKEN": "forged",
                    }
                ),
            },
        )
    run_id = await queue_run(db, company_id=company, agent_id=agent, reason="env_check")
    row = await wait_for(db, run_id)
    assert row["status"] == "succeeded", row["error"]
    events = await run_events(db, run_id)
    env = json.loads("".join(e["message"] for e in events if e["type"] == "stdout"))
    settings: Settings = services.settings
    assert env["PAPERCLIP_RUN_ID"] == run_id
    assert env["PAPERCLIP_AGENT_ID"] == agent and env["PAPERCLIP_COMPANY_ID"] == company
    assert env["PAPERCLIP_API_URL"] == settings.gateway_addr
    assert env["PAPERCLIP_WAKE_REASON"] == "env_check"
    assert "PAPERCLIP_ISSUE_ID" not in env
    assert env["AGENT_SETTING"] == "configured"
    token = verify_run_token(settings.jwt_secret, env["PAPERCLIP_AGENT_TOKEN"])
    assert (token.run_id, token.agent_id, token.company_id) == (run_id, agent, company)
    allowed = {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "AGENT_SETTING"}
    leaked = {k for k in env if not k.startswith("PAPERCLIP_") and k not in allowed}
    assert not leaked, f"service environment leaked to the agent: {sorted(leaked)}"
    # Our own events never carry the token or env values.
    ours = [e for e in events if e["type"] == "lifecycle"]
    text = json.dumps([[e["message"], payload(e)] for e in ours])
    assert env["PAPERCLIP_AGENT_TOKEN"] not in text and "configured" not in text


async def _sample_running(
    db: Database, agent_ids: list[str], run_ids: list[str], *, within: float = 30.0
) -> dict[str, int]:
    """Sample per-agent running counts every 50 ms until every run is terminal; the
    maximum seen per agent."""
    most = dict.fromkeys(agent_ids, 0)
    deadline = time.monotonic() + within
    while True:
        async with db.unit_of_work() as tx:
            rows = await tx.fetch(
                sql(
                    """
                    SELECT agent_id, count(*) FILTER (WHERE status = 'running') AS running,
                           count(*) FILTER (WHERE status IN ('queued', 'running')) AS active
                    FROM runs.heartbeat_runs WHERE id = ANY(CAST(:ids AS uuid[]))
                    GROUP BY agent_id
                    """
                ),
                {"ids": run_ids},
            )
        for row in rows:
            key = str(row["agent_id"])
            most[key] = max(most[key], int(row["running"]))
        if all(int(row["active"]) == 0 for row in rows):
            return most
        assert time.monotonic() < deadline, "runs did not finish in time"
        await asyncio.sleep(0.05)


async def test_max_concurrent_runs_is_never_exceeded(
    db: Database, owner: tuple[Clients, str], dispatched: str
) -> None:
    clients, company = owner
    agent = await create_agent(
        clients, company, agent_command("sleep.py", "0.5", "0"), max_concurrent_runs=2
    )
    runs = [await queue_run(db, company_id=company, agent_id=agent) for _ in range(5)]
    most = await _sample_running(db, [agent], runs)
    assert most[agent] == 2
    for run_id in runs:
        assert (await run_row(db, run_id))["status"] == "succeeded"


async def test_two_nodes_share_the_queue_without_exceeding_limits(
    services: Services, database_url: str, suite: Suite
) -> None:
    admin_clients = suite.clients(admin())
    company = (await new_company(admin_clients)).id
    clients = suite.clients(board(company, Role.ADMIN, user_id="owner"))
    agents = [
        await create_agent(
            clients, company, agent_command("sleep.py", "0.3", "0"), max_concurrent_runs=2
        )
        for _ in range(4)
    ]
    databases = [
        Database(database_url, pool_size=5, max_overflow=5, name=f"node{i}") for i in (1, 2)
    ]
    settings = replace(services.settings, max_processes=8)
    runners = [Runner(d, settings, companies={company}) for d in databases]
    tasks = [asyncio.create_task(r.run()) for r in runners]
    try:
        for r in runners:
            await asyncio.wait_for(r.wait_registered(), 5)
        assert runners[0].node_id != runners[1].node_id
        runs = [
            await queue_run(suite.db, company_id=company, agent_id=agents[i % 4]) for i in range(20)
        ]
        most = await _sample_running(suite.db, agents, runs, within=60)
        assert all(n <= 2 for n in most.values()), most
        async with suite.db.unit_of_work() as tx:
            rows = await tx.fetch(
                sql(
                    """
                    SELECT r.id, r.status, r.supervisor_node_id,
                           (SELECT count(*) FROM runs.run_events e
                            WHERE e.run_id = r.id AND e.message = 'run started') AS starts
                    FROM runs.heartbeat_runs r WHERE r.id = ANY(CAST(:ids AS uuid[]))
                    """
                ),
                {"ids": runs},
            )
        assert len(rows) == 20
        assert all(r["status"] == "succeeded" and r["starts"] == 1 for r in rows), [
            dict(r) for r in rows
        ]
        nodes = {str(r["supervisor_node_id"]) for r in rows}
        assert nodes <= {runners[0].node_id, runners[1].node_id}
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for r in runners:
            await r.stop()
        for d in databases:
            await d.dispose()


async def test_stop_terminates_live_children_and_cancels_their_runs(
    services: Services, database_url: str, suite: Suite
) -> None:
    company = (await new_company(suite.clients(admin()))).id
    clients = suite.clients(board(company, Role.ADMIN, user_id="owner"))
    agent = await create_agent(clients, company, agent_command("sleep.py", "30", "0.2"))
    node_db = Database(database_url, pool_size=5, max_overflow=5, name="stopping-node")
    node = Runner(node_db, services.settings, companies={company})
    task = asyncio.create_task(node.run())
    try:
        run_id = await queue_run(suite.db, company_id=company, agent_id=agent)
        running = await wait_for(suite.db, run_id, ("running",))
        deadline = time.monotonic() + 5
        while running["process_pid"] is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
            running = await run_row(suite.db, run_id)
        child = psutil.Process(running["process_pid"])
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await node.stop()
        row = await run_row(suite.db, run_id)
        assert (row["status"], row["error_code"], row["error"]) == (
            "cancelled",
            "cancelled",
            "run service stopped",
        )
        _, alive = await asyncio.to_thread(psutil.wait_procs, [child], timeout=3)
        assert not alive
        async with suite.db.unit_of_work() as tx:
            stopped = await tx.fetchval(
                sql("SELECT stopped_at FROM runs.supervisor_nodes WHERE id = :id"),
                {"id": node.node_id},
            )
        assert stopped is not None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await node.stop()
        await node_db.dispose()


async def test_stop_requeues_a_claimed_run_that_never_spawned(
    services: Services, runner: Runner, database_url: str, suite: Suite
) -> None:
    company = (await new_company(suite.clients(admin()))).id
    clients = suite.clients(board(company, Role.ADMIN, user_id="owner"))
    agent = await create_agent(clients, company, agent_command("succeed.py"))
    issue = await clients.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company, title="claimed when the node stops")
    )
    node_db = Database(database_url, pool_size=5, max_overflow=5, name="stopping-claim-node")
    node = Runner(node_db, services.settings, companies={company})
    held, release = asyncio.Event(), asyncio.Event()

    async def hold_before_spawn(_run_id: str) -> None:
        # Claimed, issue lock taken, not spawned: parked here until released.
        held.set()
        await release.wait()

    node.before_spawn = hold_before_spawn
    task = asyncio.create_task(node.run())
    try:
        run_id = await queue_run(suite.db, company_id=company, agent_id=agent, issue_id=issue.id)
        await asyncio.wait_for(held.wait(), 10)
        claimed = await run_row(suite.db, run_id)
        assert (claimed["status"], str(claimed["supervisor_node_id"])) == ("running", node.node_id)
        assert claimed["process_pid"] is None

        # run() is still dispatching: stop() ends the dispatch loop itself.
        stopping = asyncio.create_task(node.stop())
        await asyncio.sleep(0.1)
        assert node.stopping
        release.set()
        await asyncio.wait_for(stopping, 10)
        await asyncio.wait_for(task, 5)
        row = await run_row(suite.db, run_id)
        assert (row["status"], row["started_at"], row["supervisor_node_id"]) == (
            "queued",
            None,
            None,
        )
        assert (row["process_pid"], row["error_code"], row["finished_at"]) == (None, None, None)
        async with suite.db.unit_of_work() as tx:
            wake = await tx.fetchval(
                sql("SELECT status FROM runs.wakeup_requests WHERE run_id = :r"), {"r": run_id}
            )
            runs = await tx.fetchval(
                sql("SELECT count(*) FROM runs.heartbeat_runs WHERE agent_id = :a"), {"a": agent}
            )
        assert (wake, runs) == ("queued", 1)  # no process_lost, no retry
        assert [e["message"] for e in await run_events(suite.db, run_id)] == []

        # Another node simply dispatches it.
        assert runner.companies is not None
        runner.companies.add(company)
        done = await wait_for(suite.db, run_id)
        assert (done["status"], str(done["supervisor_node_id"])) == ("succeeded", runner.node_id)
        events = await run_events(suite.db, run_id)
        assert [e["message"] for e in events].count("run started") == 1
    finally:
        release.set()
        if runner.companies is not None:
            runner.companies.discard(company)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await node.stop()
        await node_db.dispose()
