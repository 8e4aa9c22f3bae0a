"""Recovery of running runs whose supervisor node died:
real agent-like processes, real PostgreSQL, the real ReapOrphanedRuns RPC.

Each test records a *dead* supervisor node on this host (its pid is gone, its lease not
even expired: a crashed incarnation of the run service) and a ``running`` run under it,
then asks the session's runner for a pass. The runner's periodic passes are switched off
meanwhile so each pass is the test's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import grpc
import psutil
import pytest

from common.db import Database
from common.sql import Row, sql
from paperclip.issues.v1 import issue_locks_pb2, issues_pb2
from paperclip.runs.v1 import run_messages_pb2 as pb
from paperclip.runs.v1 import runs_pb2
from run_service import adopted_runs
from run_service.runner import Runner
from supervision.process_tree import boot_id
from tests.harness import Clients, Suite, admin, board, new_company, service
from tests.run_service.test_runner import (
    agent_command,
    create_agent,
    issue_row,
    payload,
    queue_run,
    run_events,
    run_row,
    wait_for,
)
from tests.waiting import wait_until

DEAD_PID = 999999999


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; whatever is left is killed (with its group) at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                psutil.Process(proc.pid).kill()
        proc.wait()


@pytest.fixture
async def world(runner: Runner, suite: Suite) -> AsyncIterator[tuple[Clients, str]]:
    """(owner clients, company) of a fresh company in the runner's scope, with the
    runner's periodic recovery passes off."""
    company = (await new_company(suite.clients(admin()))).id
    runner.recovery.periodic = False
    await runner.recovery.idle()
    assert runner.companies is not None
    runner.companies.add(company)
    yield suite.clients(board(company)), company
    runner.companies.discard(company)
    runner.recovery.periodic = True


async def paused_agent(db: Database, clients: Clients, company: str, *args: str) -> str:
    """An agent whose queued runs stay queued (paused), so a retry can be inspected."""
    agent = await create_agent(clients, company, agent_command("sleep.py", *(args or ("1",))))
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql("UPDATE runs.agents SET status = 'paused' WHERE id = :a"), {"a": agent}
        )
    return agent


async def dead_node(db: Database, *, host: str | None = None, expired: bool = False) -> str:
    """A supervisor node row of a crashed run service: its pid is gone."""
    async with db.unit_of_work() as tx:
        node = await tx.fetchval(
            sql(
                """
                INSERT INTO runs.supervisor_nodes
                    (host, boot_id, pid, process_started_at, max_processes, lease_expires_at)
                VALUES (:host, :boot, :pid, now(), 5,
                        now() + make_interval(secs => CASE WHEN :expired THEN -1 ELSE 60 END))
                RETURNING id
                """
            ),
            {
                "host": host or socket.gethostname(),
                "boot": boot_id(),
                "pid": DEAD_PID,
                "expired": expired,
            },
        )
    return str(node)


async def running_run(
    db: Database,
    *,
    company: str,
    agent: str,
    node: str,
    pid: int | None,
    created: float | None = None,
    issue_id: str | None = None,
    retry_count: int = 0,
) -> str:
    """A run as the crashed node left it: running, its process identity recorded."""
    run_id = await queue_run(db, company_id=company, agent_id=agent, issue_id=issue_id)
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql(
                """
                UPDATE runs.heartbeat_runs
                SET status = 'running', started_at = now(), supervisor_node_id = :node,
                    process_pid = :pid, process_group_id = :pid, process_started_at = :created,
                    grace_seconds = 1, process_loss_retry_count = :count
                WHERE id = :id
                """
            ),
            {
                "id": run_id,
                "node": node,
                "pid": pid,
                "created": datetime.fromtimestamp(created or time.time(), UTC),
                "count": retry_count,
            },
        )
        await tx.execute(
            sql("UPDATE runs.wakeup_requests SET status = 'claimed' WHERE run_id = :r"),
            {"r": run_id},
        )
    return run_id


def spawn_sleeper(procs: list[subprocess.Popen[bytes]], seconds: float) -> tuple[int, float]:
    """A silent agent-like process in its own session; (pid, create time)."""
    proc = subprocess.Popen(
        [*agent_command("sleep.py", str(seconds), "0")],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
    )
    procs.append(proc)
    return proc.pid, psutil.Process(proc.pid).create_time()


def spawn_leader_with_member(
    procs: list[subprocess.Popen[bytes]],
) -> tuple[subprocess.Popen[bytes], float, psutil.Process]:
    """A group leader that starts a member of its group and exits (reaped): (leader,
    its create time, the member still running)."""
    leader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
            "print(p.pid, flush=True)",
        ],
        start_new_session=True,
        stdout=subprocess.PIPE,
    )
    procs.append(leader)
    created = psutil.Process(leader.pid).create_time()
    assert leader.stdout is not None
    member = psutil.Process(int(leader.stdout.readline()))
    leader.wait(timeout=5)
    return leader, created, member


async def issue_run(
    db: Database,
    suite: Suite,
    *,
    clients: Clients,
    company: str,
    agent: str,
    node: str,
    **fields: object,
) -> tuple[str, str]:
    """(run, issue): a running run on an issue whose execution lock it holds."""
    issue = await clients.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(company_id=company, title="recovery")
    )
    run_id = await running_run(
        db,
        company=company,
        agent=agent,
        node=node,
        issue_id=issue.id,
        **fields,  # type: ignore[arg-type]
    )
    await suite.clients(service()).locks.AcquireExecutionLock(
        issue_locks_pb2.AcquireExecutionLockRequest(
            issue_id=issue.id, run_id=run_id, agent_id=agent
        )
    )
    assert str((await issue_row(db, issue.id))["execution_run_id"]) == run_id
    return run_id, issue.id


async def reap(suite: Suite) -> runs_pb2.ReapOrphanedRunsResponse:
    return await suite.clients(admin()).runs.ReapOrphanedRuns(runs_pb2.ReapOrphanedRunsRequest())


async def runs_of(db: Database, agent: str) -> list[Row]:
    async with db.unit_of_work() as tx:
        return await tx.fetch(
            sql("SELECT * FROM runs.heartbeat_runs WHERE agent_id = :a ORDER BY created_at"),
            {"a": agent},
        )


async def eventually(check: object, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while True:
        assert callable(check)
        if await check():
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


# --- A1: live pid -> adopted ------------------------------------------------------------


async def test_a1_live_pid_is_adopted_not_reaped(
    runner: Runner,
    db: Database,
    suite: Suite,
    world: tuple[Clients, str],
    procs: list[subprocess.Popen[bytes]],
) -> None:
    clients, company = world
    agent = await paused_agent(db, clients, company)
    node = await dead_node(db)
    pid, created = spawn_sleeper(procs, 30)
    run_id = await running_run(
        db, company=company, agent=agent, node=node, pid=pid, created=created
    )

    reply = await reap(suite)
    assert (reply.reaped, list(reply.run_ids), list(reply.detached_run_ids)) == (0, [], [run_id])
    row = await run_row(db, run_id)
    assert row["status"] == "running" and row["error_code"] == "process_detached"
    assert row["error"] == f"Lost in-memory process handle, but child pid {pid} is still alive"
    assert str(row["supervisor_node_id"]) == runner.node_id
    assert run_id in runner.live_runs and psutil.pid_exists(pid)
    async with db.unit_of_work() as tx:
        wake = await tx.fetchval(
            sql("SELECT status FROM runs.wakeup_requests WHERE run_id = :r"), {"r": run_id}
        )
    assert wake == "claimed"
    assert (await run_events(db, run_id))[-1]["message"] == row["error"]

    # A second pass finds nothing: the run is this node's now.
    again = await reap(suite)
    assert (again.reaped, list(again.detached_run_ids)) == (0, [])

    # A5: the agent reports activity -> the marker is cleared.
    cleared = await suite.clients(service()).runs.ReportRunActivity(
        runs_pb2.ReportRunActivityRequest(run_id=run_id)
    )
    assert (cleared.error_code, cleared.error) == ("", "")

    # CancelRun on the adopted run kills its tree and ends it cancelled.
    run = await clients.runs.CancelRun(runs_pb2.CancelRunRequest(run_id=run_id, reason="stop it"))
    assert run.status == pb.RUN_STATUS_CANCELLED and run.error == "stop it"
    assert procs[0].wait(timeout=3) is not None
    # The run leaves the runner's live set once its after-run steps are done.
    await wait_until(lambda: run_id not in runner.live_runs, within=5, what="the run to leave")
    assert (await run_events(db, run_id))[-1]["message"] == "run cancelled"


async def test_adopted_run_that_exits_is_finalized_by_the_pid_poller(
    runner: Runner,
    db: Database,
    suite: Suite,
    world: tuple[Clients, str],
    procs: list[subprocess.Popen[bytes]],
) -> None:
    clients, company = world
    agent = await paused_agent(db, clients, company)
    node = await dead_node(db)
    pid, created = spawn_sleeper(procs, 1.0)
    run_id, issue_id = await issue_run(
        db,
        suite,
        clients=clients,
        company=company,
        agent=agent,
        node=node,
        pid=pid,
        created=created,
    )
    reply = await reap(suite)
    assert list(reply.detached_run_ids) == [run_id]
    row = await wait_for(db, run_id, within=6)
    assert (row["status"], row["error_code"], row["error"]) == (
        "failed",
        "adapter_failed",
        adopted_runs.ADOPTED_EXIT_ERROR,
    )
    # The run leaves the runner's live set once its after-run steps are done.
    await wait_until(lambda: run_id not in runner.live_runs, within=5, what="the run to leave")

    async def released() -> bool:
        return (await issue_row(db, issue_id))["execution_run_id"] is None

    await eventually(released)
    assert len(await runs_of(db, agent)) == 1  # an adopted exit is not a process loss


# --- limits of adopted runs -------------------------------------------------------------


async def set_limits(
    db: Database, run_id: str, *, wall_clock: int, idle: int, started_ago: int = 0
) -> None:
    """The run's limits snapshot, and its start ``started_ago`` seconds back."""
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql(
                """
                UPDATE runs.heartbeat_runs
                SET timeout_seconds = :timeout, idle_timeout_seconds = :idle,
                    started_at = now() - CAST(:ago AS integer) * interval '1 second'
                WHERE id = :id
                """
            ),
            {"id": run_id, "timeout": wall_clock, "idle": idle, "ago": started_ago},
        )


async def test_adopted_run_past_its_wall_clock_is_killed_and_timed_out(
    runner: Runner,
    db: Database,
    suite: Suite,
    world: tuple[Clients, str],
    procs: list[subprocess.Popen[bytes]],
) -> None:
    clients, company = world
    agent = await paused_agent(db, clients, company)
    node = await dead_node(db)
    pid, created = spawn_sleeper(procs, 30)
    run_id, issue_id = await issue_run(
        db,
        suite,
        clients=clients,
        company=company,
        agent=agent,
        node=node,
        pid=pid,
        created=created,
    )
    await set_limits(db, run_id, wall_clock=60, idle=0, started_ago=3600)
    assert list((await reap(suite)).detached_run_ids) == [run_id]

    row = await wait_for(db, run_id, within=6)
    assert (row["status"], row["error_code"], row["error"]) == (
        "timed_out",
        "timeout",
        "timed out after 60 s",
    )
    assert procs[0].wait(timeout=3) is not None
    # The run leaves the runner's live set once its after-run steps are done.
    await wait_until(lambda: run_id not in runner.live_runs, within=5, what="the run to leave")
    assert (await run_events(db, run_id))[-1]["message"] == "run timed_out"

    async def released() -> bool:
        return (await issue_row(db, issue_id))["execution_run_id"] is None

    await eventually(released)
    assert len(await runs_of(db, agent)) == 1  # a timeout is not a process loss: no retry


async def test_adopted_run_without_activity_hits_its_idle_timeout(
    runner: Runner,
    db: Database,
    suite: Suite,
    world: tuple[Clients, str],
    procs: list[subprocess.Popen[bytes]],
) -> None:
    clients, company = world
    agent = await paused_agent(db, clients, company)
    node = await dead_node(db)
    pid, created = spawn_sleeper(procs, 30)
    run_id = await running_run(
        db, company=company, agent=agent, node=node, pid=pid, created=created
    )
    await set_limits(db, run_id, wall_clock=0, idle=1)
    assert list((await reap(suite)).detached_run_ids) == [run_id]

    row = await wait_for(db, run_id, within=6)
    assert (row["status"], row["error_code"]) == ("timed_out", "idle_timeout")
    assert procs[0].wait(timeout=3) is not None
    # The run leaves the runner's live set just after its terminal write.
    await wait_until(lambda: run_id not in runner.live_runs, within=5, what="the run to leave")


async def test_reported_activity_keeps_an_adopted_run_alive(
    runner: Runner,
    db: Database,
    suite: Suite,
    world: tuple[Clients, str],
    procs: list[subprocess.Popen[bytes]],
) -> None:
    clients, company = world
    agent = await paused_agent(db, clients, company)
    node = await dead_node(db)
    pid, created = spawn_sleeper(procs, 30)
    run_id = await running_run(
        db, company=company, agent=agent, node=node, pid=pid, created=created
    )
    await set_limits(db, run_id, wall_clock=0, idle=2)
    assert list((await reap(suite)).detached_run_ids) == [run_id]

    # Twice the idle limit, reporting activity every half second: never stopped.
    agent_runs = suite.clients(service()).runs
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        await agent_runs.ReportRunActivity(runs_pb2.ReportRunActivityRequest(run_id=run_id))
        await asyncio.sleep(0.5)
        assert (await run_row(db, run_id))["status"] == "running"
        assert procs[0].poll() is None and run_id in runner.live_runs

    # Silent from now on: the idle limit applies again.
    row = await wait_for(db, run_id, within=6)
    assert (row["status"], row["error_code"]) == ("timed_out", "idle_timeout")
    assert procs[0].wait(timeout=3) is not None


# --- A2 / A3 / A4 / B21: lost -------------------------------------------------------------


async def test_a2_dead_pid_is_lost_and_retried_once_with_the_lock(
    db: Database, suite: Suite, world: tuple[Clients, str]
) -> None:
    clients, company = world
    agent = await paused_agent(db, clients, company)
    node = await dead_node(db)
    run_id, issue_id = await issue_run(
        db, suite, clients=clients, company=company, agent=agent, node=node, pid=DEAD_PID
    )

    reply = await reap(suite)
    assert (reply.reaped, list(reply.run_ids), list(reply.detached_run_ids)) == (1, [run_id], [])
    runs = await runs_of(db, agent)
    assert len(runs) == 2
    original, retry = runs
    assert str(original["id"]) == run_id
    assert (original["status"], original["error_code"]) == ("failed", "process_lost")
    assert original["error"] == (
        f"Process lost -- child pid {DEAD_PID} is no longer running; retrying once"
    )
    assert retry["status"] == "queued" and str(retry["retry_of_run_id"]) == run_id
    assert retry["process_loss_retry_count"] == 1
    assert (retry["retry_reason"], retry["wake_reason"]) == ("process_lost", "process_lost_retry")
    assert str(retry["issue_id"]) == issue_id
    assert str((await issue_row(db, issue_id))["execution_run_id"]) == str(retry["id"])
    events = await run_events(db, run_id)
    assert events[-1]["message"] == "run failed"
    async with db.unit_of_work() as tx:
        wakes = await tx.fetch(
            sql("SELECT status, reason, run_id FROM runs.wakeup_requests WHERE agent_id = :a"),
            {"a": agent},
        )
        state = await tx.fetchrow(
            sql("SELECT * FROM runs.agent_runtime_state WHERE agent_id = :a"), {"a": agent}
        )
    assert sorted((w["status"], w["reason"]) for w in wakes) == [
        ("failed", "test"),
        ("queued", "process_lost_retry"),
    ]
    assert state is not None and state["last_run_status"] == "failed"
    assert "Process lost -- child pid 999999999 is no longer running" in state["last_error"]


async def test_a3_leader_gone_group_member_alive_is_killed(
    db: Database,
    suite: Suite,
    world: tuple[Clients, str],
    procs: list[subprocess.Popen[bytes]],
) -> None:
    clients, company = world
    agent = await paused_agent(db, clients, company)
    node = await dead_node(db)
    leader, created, member = spawn_leader_with_member(procs)
    assert member.is_running() and member.status() != psutil.STATUS_ZOMBIE
    run_id, issue_id = await issue_run(
        db,
        suite,
        clients=clients,
        company=company,
        agent=agent,
        node=node,
        pid=leader.pid,
        created=created,
    )

    started = time.monotonic()
    reply = await reap(suite)
    assert list(reply.run_ids) == [run_id]
    gone, _ = await asyncio.to_thread(psutil.wait_procs, [member], 2)
    assert gone and time.monotonic() - started < 4
    row = await run_row(db, run_id)
    assert (row["status"], row["error_code"]) == ("failed", "process_lost")
    assert "descendant process group" in row["error"]
    runs = await runs_of(db, agent)
    assert len(runs) == 2 and runs[1]["status"] == "queued"
    assert str((await issue_row(db, issue_id))["execution_run_id"]) == str(runs[1]["id"])


async def test_a4_retry_already_used_fails_and_releases(
    db: Database, suite: Suite, world: tuple[Clients, str]
) -> None:
    clients, company = world
    agent = await paused_agent(db, clients, company)
    node = await dead_node(db)
    run_id, issue_id = await issue_run(
        db,
        suite,
        clients=clients,
        company=company,
        agent=agent,
        node=node,
        pid=DEAD_PID,
        retry_count=1,
    )
    reply = await reap(suite)
    assert (reply.reaped, list(reply.run_ids)) == (1, [run_id])
    runs = await runs_of(db, agent)
    assert len(runs) == 1
    assert (runs[0]["status"], runs[0]["error_code"]) == ("failed", "process_lost")
    assert not runs[0]["error"].endswith("retrying once")
    assert (await issue_row(db, issue_id))["execution_run_id"] is None


async def test_b21_running_without_a_pid_is_lost(
    db: Database, suite: Suite, world: tuple[Clients, str]
) -> None:
    clients, company = world
    agent = await paused_agent(db, clients, company)
    node = await dead_node(db, expired=True)
    run_id = await running_run(db, company=company, agent=agent, node=node, pid=None)
    reply = await reap(suite)
    assert list(reply.run_ids) == [run_id]
    row = await run_row(db, run_id)
    assert (row["status"], row["error_code"], row["process_pid"]) == (
        "failed",
        "process_lost",
        None,
    )
    assert "before an adapter child process was recorded" in row["error"]
    events = await run_events(db, run_id)
    assert any(payload(e).get("stalePreSpawnActiveRun") is True for e in events)
    runs = await runs_of(db, agent)
    assert len(runs) == 2 and runs[1]["process_loss_retry_count"] == 1


async def test_run_of_a_dead_node_on_another_host_is_lost(
    db: Database, suite: Suite, world: tuple[Clients, str]
) -> None:
    clients, company = world
    agent = await paused_agent(db, clients, company)
    node = await dead_node(db, host=f"gone-{time.time_ns()}", expired=True)
    run_id = await running_run(db, company=company, agent=agent, node=node, pid=DEAD_PID)
    reply = await reap(suite)
    assert list(reply.run_ids) == [run_id]
    assert "server may have restarted" in (await run_row(db, run_id))["error"]


async def test_live_nodes_runs_are_left_alone(
    db: Database,
    suite: Suite,
    world: tuple[Clients, str],
    procs: list[subprocess.Popen[bytes]],
) -> None:
    clients, company = world
    agent = await paused_agent(db, clients, company)
    # The node of another run-service process on this host, alive (its lease as well).
    node_pid, node_created = spawn_sleeper(procs, 30)
    async with db.unit_of_work() as tx:
        node = await tx.fetchval(
            sql(
                """
                INSERT INTO runs.supervisor_nodes
                    (host, boot_id, pid, process_started_at, max_processes, lease_expires_at)
                VALUES (:host, :boot, :pid, :started, 5, now() + interval '60 seconds')
                RETURNING id
                """
            ),
            {
                "host": socket.gethostname(),
                "boot": boot_id(),
                "pid": node_pid,
                "started": datetime.fromtimestamp(node_created, UTC),
            },
        )
    run_id = await running_run(db, company=company, agent=agent, node=str(node), pid=None)
    reply = await reap(suite)
    assert (reply.reaped, list(reply.detached_run_ids)) == (0, [])
    assert (await run_row(db, run_id))["status"] == "running"
    async with db.unit_of_work() as tx:  # leave nothing running behind
        await tx.execute(
            sql("UPDATE runs.heartbeat_runs SET status = 'cancelled' WHERE id = :id"),
            {"id": run_id},
        )


async def test_reap_requires_an_instance_admin(suite: Suite, world: tuple[Clients, str]) -> None:
    clients, _ = world
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await clients.runs.ReapOrphanedRuns(runs_pb2.ReapOrphanedRunsRequest())
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
