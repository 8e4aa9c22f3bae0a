"""Real runs that hold an environment lease and end (docs/architecture.md, "Run ends"; user
asks row 23): the run service's after-terminal step calls ReleaseRunLeases on the
workspace server, and no active lease is left, whichever way the run ended.

Each run is a real agent process (tests/agents/sleep.py) dispatched by the session's
runner. The lease is taken while the run is still queued (its company is not dispatched
yet), so it is held before the agent starts. The workspace sweep does not run in the
test session, and the audit row names the run service: the release came from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from common.db import Database
from paperclip.runs.v1 import agents_pb2, runs_pb2
from paperclip.runs.v1 import run_messages_pb2 as runs_pb
from paperclip.workspaces.v1 import workspace_leases_pb2
from run_service.runner import Runner
from tests.harness import Suite
from tests.workspace_service.test_leases import World, acquire, lease_audit, lease_row, new_world

AGENTS = Path(__file__).resolve().parents[1] / "agents"
#: Generous: a run is dispatched, spawned and ended, then its after-terminal step runs.
WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class RunEnd:
    """One way a run holding a lease ends, and what that makes of the lease."""

    name: str
    sleep_seconds: str
    #: The agent's wall-clock limit (None: the default, far beyond the test).
    timeout_seconds: int | None
    run_status: runs_pb.RunStatus.ValueType
    lease_status: str


RUN_ENDS = [
    RunEnd("sigkill", "30", None, runs_pb.RUN_STATUS_FAILED, "failed"),
    RunEnd("timeout", "30", 1, runs_pb.RUN_STATUS_TIMED_OUT, "failed"),
    RunEnd("cancel", "30", None, runs_pb.RUN_STATUS_CANCELLED, "expired"),
    RunEnd("success", "0.2", None, runs_pb.RUN_STATUS_SUCCEEDED, "released"),
]


@pytest.fixture
async def world(suite: Suite, db: Database, tmp_path: Path) -> World:
    return await new_world(suite, db, tmp_path)


@pytest.fixture
def marker() -> Iterator[str]:
    """A token on the agent's command line; whatever still runs with it is killed at
    teardown (a failing test leaves no sleeping agent behind)."""
    token = f"lease-runs-{uuid.uuid4().hex[:10]}"
    yield token
    for proc in psutil.process_iter(["cmdline"]):
        if token in (proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                proc.kill()


@pytest.mark.parametrize("ending", RUN_ENDS, ids=[e.name for e in RUN_ENDS])
async def test_ended_run_leaves_no_active_lease(
    db: Database, runner: Runner, world: World, marker: str, ending: RunEnd
) -> None:
    agent_id = await sleeping_agent(world, ending, marker)
    wake = await world.owner.runs.WakeAgent(
        runs_pb2.WakeAgentRequest(agent_id=agent_id, source=runs_pb.WAKE_SOURCE_ON_DEMAND)
    )
    run_id = wake.run.id
    assert run_id and wake.run.status == runs_pb.RUN_STATUS_QUEUED
    lease = await world.owner.workspaces.AcquireEnvironmentLease(acquire(world, run_id=run_id))

    assert runner.companies is not None
    runner.companies.add(world.company_id)
    try:
        runner.wake()
        if ending.name == "sigkill":
            pid = (await wait_run(world, run_id, running=True)).process_pid
            os.kill(pid, signal.SIGKILL)
        elif ending.name == "cancel":
            await wait_run(world, run_id, running=True)
            await world.owner.runs.CancelRun(runs_pb2.CancelRunRequest(run_id=run_id))
        run = await wait_run(world, run_id)
    finally:
        runner.companies.discard(world.company_id)
    assert run.status == ending.run_status, run

    row = await wait_lease_ended(db, lease.id)
    assert row["status"] == ending.lease_status
    if ending.lease_status == "failed":
        assert row["failure_reason"] == run.error
    audit = await lease_audit(db, lease.id)
    assert (audit[-1]["action"], audit[-1]["actor_type"], audit[-1]["actor_id"]) == (
        "environment.lease_released",
        "service",
        "run_service",
    )
    reply = await world.service.leases.ReleaseRunLeases(
        workspace_leases_pb2.ReleaseRunLeasesRequest(run_id=run_id, run_status=ending.run_status)
    )
    assert list(reply.lease_ids) == []  # nothing left active for the run


async def sleeping_agent(world: World, ending: RunEnd, marker: str) -> str:
    """A process agent that sleeps as long as ``ending`` needs; its id."""
    command = [sys.executable, str(AGENTS / "sleep.py"), ending.sleep_seconds, "0.2", marker]
    agent = await world.owner.runs.CreateAgent(
        agents_pb2.CreateAgentRequest(
            company_id=world.company_id,
            name=f"leaseholder-{uuid.uuid4().hex[:8]}",
            role="engineer",
            adapter_type="process",
            adapter_config=agents_pb2.AdapterConfig(command=command),
            runtime_config=agents_pb2.RuntimeConfig(
                grace_seconds=1, timeout_seconds=ending.timeout_seconds
            ),
        )
    )
    return agent.id


async def wait_run(world: World, run_id: str, *, running: bool = False) -> runs_pb.Run:
    """The run once it has ended (or, with ``running``, once its process started)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        run = await world.owner.runs.GetRun(runs_pb2.GetRunRequest(run_id=run_id))
        if running and run.status == runs_pb.RUN_STATUS_RUNNING and run.process_pid:
            return run
        if run.status not in (runs_pb.RUN_STATUS_QUEUED, runs_pb.RUN_STATUS_RUNNING):
            assert not running, f"run ended before it was seen running: {run}"
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run.status}"
        await asyncio.sleep(0.05)


async def wait_lease_ended(db: Database, lease_id: str) -> dict[str, object]:
    """The lease's row once it is no longer active."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        row = await lease_row(db, lease_id)
        if row["status"] != "active":
            return dict(row)
        assert time.monotonic() < deadline, f"lease {lease_id} still active"
        await asyncio.sleep(0.05)
