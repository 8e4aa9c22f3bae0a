"""Faults of a supervised agent (issue 4, "Faults"), with the session's in-process runner.

The agent is SIGKILLed from outside; it ignores SIGTERM; it leaves grandchildren
behind; it is silent past its idle timeout (or chatty, or silent but reporting
activity); it floods stdout. Each agent's command line carries a marker of its test, so
whatever a failing test leaves running is killed at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
import psutil
import pytest

from common.actor import Role
from common.db import Database
from common.sql import Row, sql
from paperclip.issues.v1 import issues_pb2
from paperclip.runs.v1 import runs_pb2
from run_service.runner import Runner
from tests.harness import Clients, Suite, admin, agent, board, new_company
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

MIB = 1024 * 1024
#: The per-run cap of stored output (``ProcessLimits.run_max_bytes``'s default).
RUN_CAP_BYTES = 4 * MIB


@dataclass
class Leftovers:
    """Processes a test started: agents (found by ``marker`` in their command line) and
    any other pid it ``track``s (grandchildren); all killed at teardown."""

    marker: str = field(default_factory=lambda: f"faults-{uuid.uuid4().hex[:10]}")
    pids: list[int] = field(default_factory=list)

    def command(self, script: str, *args: str) -> list[str]:
        """The command of a test agent, marked as this test's."""
        return agent_command(script, *args, self.marker)

    def track(self, *pids: int) -> None:
        self.pids.extend(pids)

    def kill_all(self) -> None:
        procs: list[psutil.Process] = []
        for proc in psutil.process_iter(["cmdline"]):
            if self.marker in (proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error):
                    procs += [proc, *proc.children(recursive=True)]
        for pid in self.pids:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        deadline = time.monotonic() + 3
        while not all(dead(p.pid) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture
def leftovers() -> Iterator[Leftovers]:
    tracker = Leftovers()
    yield tracker
    tracker.kill_all()


@pytest.fixture
async def company(runner: Runner, suite: Suite) -> AsyncIterator[tuple[Clients, str]]:
    """(clients of an admin member, id) of a fresh company the session's runner
    dispatches during the test."""
    company_id = (await new_company(suite.clients(admin()))).id
    assert runner.companies is not None
    runner.companies.add(company_id)
    yield suite.clients(board(company_id, Role.ADMIN, user_id="owner")), company_id
    runner.companies.discard(company_id)


async def wait_spawned(db: Database, run_id: str, *, within: float = 10.0) -> Row:
    """The run row once its process is recorded (the run counts as started)."""
    deadline = time.monotonic() + within
    while True:
        row = await run_row(db, run_id)
        if row["status"] == "running" and row["process_pid"] is not None:
            return row
        assert row["status"] in ("queued", "running"), f"run ended early: {dict(row)}"
        assert time.monotonic() < deadline, f"run {run_id} never started its process"
        await asyncio.sleep(0.05)


async def first_stdout(db: Database, run_id: str, *, within: float = 10.0) -> str:
    """The first stdout event's text (the agent has started doing its thing)."""
    deadline = time.monotonic() + within
    while True:
        stdout = [e for e in await run_events(db, run_id) if e["type"] == "stdout"]
        if stdout:
            return str(stdout[0]["message"])
        assert time.monotonic() < deadline, f"run {run_id} printed nothing"
        await asyncio.sleep(0.05)


def dead(pid: int) -> bool:
    """Whether ``pid`` is gone (or an unreaped zombie)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def seconds(row: Row) -> float:
    """From the run's claim to its terminal write."""
    return float((row["finished_at"] - row["started_at"]).total_seconds())


async def test_sigkilled_agent_fails_the_run_and_clears_the_issue_locks(
    db: Database, company: tuple[Clients, str], leftovers: Leftovers
) -> None:
    clients, company_id = company
    agent_id = await create_agent(clients, company_id, leftovers.command("sleep.py", "30", "0.2"))
    issue = await clients.issues.CreateIssue(
        issues_pb2.CreateIssueRequest(
            company_id=company_id,
            title="the agent dies",
            status=issues_pb2.ISSUE_STATUS_TODO,
            assignee_agent_id=agent_id,
        )
    )
    run_id = await queue_run(db, company_id=company_id, agent_id=agent_id, issue_id=issue.id)
    running = await wait_spawned(db, run_id)
    held = await issue_row(db, issue.id)
    # The harness checked the issue out for the run before spawning it.
    assert (str(held["execution_run_id"]), str(held["checkout_run_id"])) == (run_id, run_id)

    os.kill(running["process_pid"], signal.SIGKILL)
    row = await wait_for(db, run_id, within=10)
    assert (row["status"], row["error_code"], row["signal"], row["exit_code"]) == (
        "failed",
        "adapter_failed",
        "SIGKILL",
        None,
    ), dict(row)
    events = await run_events(db, run_id)
    assert events[-1]["message"] == "run failed"
    assert payload(events[-1])["signal"] == "SIGKILL"

    deadline = time.monotonic() + 10
    while True:
        locks = await issue_row(db, issue.id)
        if locks["execution_run_id"] is None and locks["checkout_run_id"] is None:
            break
        assert time.monotonic() < deadline, f"issue locks not cleared: {dict(locks)}"
        await asyncio.sleep(0.05)
    assert locks["execution_locked_at"] is None
    async with db.unit_of_work() as tx:
        state = await tx.fetchrow(
            sql("SELECT * FROM runs.agent_runtime_state WHERE agent_id = :a"), {"a": agent_id}
        )
    assert state is not None
    assert (str(state["last_run_id"]), state["last_run_status"]) == (run_id, "failed")
    assert "SIGKILL" in (state["last_error"] or "")


async def test_agent_ignoring_sigterm_is_killed_after_the_grace_period(
    db: Database, company: tuple[Clients, str], leftovers: Leftovers
) -> None:
    clients, company_id = company
    agent_id = await create_agent(
        clients,
        company_id,
        leftovers.command("ignore_sigterm.py"),
        timeout_seconds=1,
        grace_seconds=1,
    )
    run_id = await queue_run(db, company_id=company_id, agent_id=agent_id)
    pid = (await wait_spawned(db, run_id))["process_pid"]
    assert (await first_stdout(db, run_id)).strip() == "ready"  # SIGTERM is ignored now
    row = await wait_for(db, run_id, within=10)
    assert (row["status"], row["error_code"]) == ("timed_out", "timeout"), dict(row)
    # SIGTERM did nothing: the grace period passed, then SIGKILL ended it.
    assert row["signal"] == "SIGKILL", dict(row)
    timeout, grace = 1.0, 1.0
    assert timeout + grace - 0.1 <= seconds(row) <= timeout + grace + 2.0, seconds(row)
    assert dead(pid)


async def test_grandchildren_are_killed_when_the_run_times_out(
    db: Database, company: tuple[Clients, str], leftovers: Leftovers
) -> None:
    clients, company_id = company
    agent_id = await create_agent(
        clients, company_id, leftovers.command("grandchildren.py"), timeout_seconds=1
    )
    run_id = await queue_run(db, company_id=company_id, agent_id=agent_id)
    pids: dict[str, int] = json.loads(await first_stdout(db, run_id))
    leftovers.track(*pids.values())
    assert not any(dead(pid) for pid in pids.values())
    row = await wait_for(db, run_id, within=10)
    assert (row["status"], row["error_code"]) == ("timed_out", "timeout"), dict(row)
    deadline = time.monotonic() + 3
    while alive := [name for name, pid in pids.items() if not dead(pid)]:
        assert time.monotonic() < deadline, f"grandchildren left behind: {alive}"
        await asyncio.sleep(0.05)
    assert dead(row["process_pid"])


async def test_silent_agent_is_killed_at_its_idle_timeout(
    db: Database, company: tuple[Clients, str], leftovers: Leftovers
) -> None:
    clients, company_id = company
    agent_id = await create_agent(
        clients, company_id, leftovers.command("sleep.py", "30", "0"), idle_timeout_seconds=1
    )
    run_id = await queue_run(db, company_id=company_id, agent_id=agent_id)
    row = await wait_for(db, run_id, within=10)
    assert (row["status"], row["error_code"]) == ("timed_out", "idle_timeout"), dict(row)
    assert "no output or activity" in row["error"]
    assert 0.9 <= seconds(row) < 5.0, seconds(row)
    assert dead(row["process_pid"])


async def test_chatty_agent_is_not_idle_killed(
    db: Database, company: tuple[Clients, str], leftovers: Leftovers
) -> None:
    clients, company_id = company
    agent_id = await create_agent(
        clients, company_id, leftovers.command("sleep.py", "3", "0.2"), idle_timeout_seconds=1
    )
    run_id = await queue_run(db, company_id=company_id, agent_id=agent_id)
    row = await wait_for(db, run_id, within=15)
    assert (row["status"], row["error_code"], row["exit_code"]) == ("succeeded", None, 0), dict(row)
    assert seconds(row) >= 2.9  # well past the idle timeout
    assert row["last_output_at"] is not None


async def test_reported_activity_keeps_a_silent_agent_alive(
    suite: Suite, db: Database, company: tuple[Clients, str], leftovers: Leftovers
) -> None:
    clients, company_id = company
    agent_id = await create_agent(
        clients, company_id, leftovers.command("sleep.py", "3", "0"), idle_timeout_seconds=1
    )
    run_id = await queue_run(db, company_id=company_id, agent_id=agent_id)
    await wait_spawned(db, run_id)
    as_agent = suite.clients(agent(agent_id, company_id, run_id))
    reports = 0
    try:
        while (await run_row(db, run_id))["status"] == "running":
            try:
                await as_agent.runs.ReportRunActivity(
                    runs_pb2.ReportRunActivityRequest(run_id=run_id)
                )
                reports += 1
            except grpc.aio.AioRpcError as exc:  # the run ended meanwhile
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
                break
            await asyncio.sleep(0.3)
    finally:
        await as_agent.close()
    row = await wait_for(db, run_id, within=10)
    assert (row["status"], row["error_code"], row["exit_code"]) == ("succeeded", None, 0), dict(row)
    assert row["stdout_bytes"] == len(b"done\n")  # silent until its last line
    assert reports >= 5 and seconds(row) >= 2.9


async def test_flood_is_capped_counted_and_marked_once(
    db: Database, company: tuple[Clients, str], leftovers: Leftovers
) -> None:
    clients, company_id = company
    agent_id = await create_agent(clients, company_id, leftovers.command("flood.py", "10"))
    run_id = await queue_run(db, company_id=company_id, agent_id=agent_id)
    row = await wait_for(db, run_id, within=30)
    assert (row["status"], row["exit_code"]) == ("succeeded", 0), dict(row)
    assert row["stdout_bytes"] == 10 * MIB
    assert row["log_truncated"] is True
    events = await run_events(db, run_id)
    markers = [e for e in events if payload(e).get("truncated") is True]
    assert len(markers) == 1, [e["message"] for e in markers]
    assert markers[0]["type"] == "lifecycle"
    assert markers[0]["message"].startswith("output truncated")
    stdout = [e for e in events if e["type"] == "stdout"]
    stored = sum(len(e["message"].encode()) for e in stdout)
    assert 0 < stored <= RUN_CAP_BYTES, stored
    # Nothing of the output is stored after the marker; the run's end is the last event.
    assert all(e["seq"] < markers[0]["seq"] for e in stdout)
    assert events[-1]["message"] == "run succeeded"
