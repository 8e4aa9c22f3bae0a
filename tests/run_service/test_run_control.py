"""CancelRun and ReportRunActivity, called directly on a real database.

Only the node-local part (the runner) is a recording fake; the database, the process
tree kill and the listener are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import psutil
import pytest

from common.actor import Role
from common.db import Database
from common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from common.sql import sql
from paperclip.runs.v1 import run_messages_pb2 as pb
from paperclip.runs.v1 import runs_pb2
from run_service import run_control, run_queries
from tests.harness import Suite, admin, agent, board, expect_error, service
from tests.run_service.test_run_queries import (
    World,
    append,
    expect,
    fetch_one,
    fields,
    finish,
    new_world,
    seed_run,
    stdout,
)


@dataclass
class FakeRunner:
    """A runner with no local runs (or, with ``local``, one that supervises them and
    finalizes a cancelled run shortly after, as the executor does)."""

    db: Database | None = None
    local: bool = False
    cancels: list[tuple[str, str]] = field(default_factory=list)
    touches: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    hostname: str = field(default_factory=socket.gethostname)

    async def cancel(self, run_id: str, reason: str) -> bool:
        self.cancels.append((run_id, reason))
        if not self.local:
            return False
        assert self.db is not None
        self.tasks.append(asyncio.create_task(self._finalize_later(run_id, reason)))
        return True

    async def _finalize_later(self, run_id: str, reason: str) -> None:
        await asyncio.sleep(0.3)
        async with self.db.unit_of_work() as tx:  # type: ignore[union-attr]
            await tx.execute(
                sql(
                    "UPDATE runs.heartbeat_runs SET status = 'cancelled', finished_at = now(),"
                    " error_code = 'cancelled', error = :reason WHERE id = :id"
                ),
                {"id": run_id, "reason": reason},
            )
        await finish_event(self.db, run_id)  # type: ignore[arg-type]

    def touch(self, run_id: str) -> bool:
        self.touches.append(run_id)
        return self.local


async def finish_event(db: Database, run_id: str) -> None:
    await append(db, run_id, [("lifecycle", "run cancelled", {"terminal": True})])


def cancel_request(run_id: str, reason: str = "") -> runs_pb2.CancelRunRequest:
    return runs_pb2.CancelRunRequest(run_id=run_id, reason=reason)


async def run_row(db: Database, run_id: str) -> dict[str, Any]:
    async with db.unit_of_work() as tx:
        row = await tx.fetchrow(
            sql("SELECT * FROM runs.heartbeat_runs WHERE id = :id"), {"id": run_id}
        )
    assert row is not None
    return dict(row)


async def events(db: Database, run_id: str) -> list[tuple[int, str, str, str]]:
    async with db.unit_of_work() as tx:
        rows = await tx.fetch(
            sql(
                "SELECT seq, type, message, payload::text AS payload FROM runs.run_events"
                " WHERE run_id = :id ORDER BY seq"
            ),
            {"id": run_id},
        )
    return [(r["seq"], r["type"], r["message"], r["payload"]) for r in rows]


async def audit_actions(db: Database, run_id: str) -> list[str]:
    async with db.unit_of_work() as tx:
        rows = await tx.fetch(
            sql(
                "SELECT action FROM audit.activity_log WHERE entity_type = 'run'"
                " AND entity_id = :id ORDER BY id"
            ),
            {"id": run_id},
        )
    return [r["action"] for r in rows]


async def seed_wake(db: Database, world: World, status: str = "queued") -> str:
    async with db.unit_of_work() as tx:
        wake = await tx.fetchval(
            sql(
                "INSERT INTO runs.wakeup_requests (company_id, agent_id, source, status)"
                " VALUES (:c, :a, 'on_demand', :s) RETURNING id"
            ),
            {"c": world.company_id, "a": world.agent_id, "s": status},
        )
    return str(wake)


async def set_process(
    db: Database, run_id: str, *, host: str, pid: int, pgid: int, created: float
) -> str:
    """Record a supervisor node on ``host`` and the run's process identity."""
    async with db.unit_of_work() as tx:
        node = await tx.fetchval(
            sql(
                "INSERT INTO runs.supervisor_nodes (host, boot_id, pid, process_started_at,"
                " max_processes, lease_expires_at)"
                " VALUES (:host, 'boot', 1, now(), 5, now()) RETURNING id"
            ),
            {"host": host},
        )
        await tx.execute(
            sql(
                "UPDATE runs.heartbeat_runs SET supervisor_node_id = :node, process_pid = :pid,"
                " process_group_id = :pgid, process_started_at = :started WHERE id = :id"
            ),
            {
                "node": node,
                "pid": pid,
                "pgid": pgid,
                "started": datetime.fromtimestamp(created, UTC),
                "id": run_id,
            },
        )
    return str(node)


# --- CancelRun ------------------------------------------------------------------------


async def test_cancel_queued_run(db: Database) -> None:
    world = await new_world(db)
    wake = await seed_wake(db, world)
    run_id = await seed_run(db, world, status="queued", wakeup_request_id=wake)
    runner = FakeRunner()

    run = await run_control.cancel_run(
        db, runner, board(world.company_id), cancel_request(run_id, "  not needed  ")
    )
    assert run.status == pb.RUN_STATUS_CANCELLED
    assert run.error_code == "cancelled" and run.error == "not needed"
    assert run.HasField("finished_at")
    assert runner.cancels == []  # a queued run has no process
    [(seq, kind, message, payload)] = await events(db, run_id)
    assert (seq, kind, message) == (1, "lifecycle", "run cancelled")
    assert '"terminal": true' in payload and '"status": "cancelled"' in payload
    assert (
        await fetch_one(
            db, "SELECT status FROM runs.wakeup_requests WHERE id = :id", id=uuid.UUID(wake)
        )
        == "cancelled"
    )
    assert await audit_actions(db, run_id) == ["run.cancelled"]
    assert (
        await fetch_one(
            db,
            "SELECT last_run_status FROM runs.agent_runtime_state WHERE agent_id = :a",
            a=uuid.UUID(world.agent_id),
        )
        == "cancelled"
    )

    # Without a reason: the default text.
    other = await seed_run(db, world, status="queued")
    run = await run_control.cancel_run(db, runner, admin(), cancel_request(other))
    assert run.error == run_control.DEFAULT_REASON


async def test_cancel_queued_run_ends_its_watchers(db: Database) -> None:
    world = await new_world(db)
    run_id = await seed_run(db, world, status="queued")
    watcher = asyncio.create_task(_watch(db, run_id))
    await asyncio.sleep(0.3)
    await run_control.cancel_run(db, FakeRunner(), admin(), cancel_request(run_id))
    assert await asyncio.wait_for(watcher, 3) == [1]


async def _watch(db: Database, run_id: str) -> list[int]:
    request = runs_pb2.WatchRunRequest(run_id=run_id)
    return [e.seq async for e in run_queries.watch_run(db, admin(), request)]


async def test_cancel_terminal_run_is_unchanged(db: Database) -> None:
    world = await new_world(db)
    for status in ("succeeded", "failed", "cancelled", "timed_out"):
        run_id = await seed_run(db, world, status=status, error_code="x", error="y")
        before = await run_row(db, run_id)
        runner = FakeRunner()
        run = await run_control.cancel_run(db, runner, admin(), cancel_request(run_id, "why"))
        assert run.status != pb.RUN_STATUS_CANCELLED or status == "cancelled"
        assert (run.error_code, run.error) == ("x", "y")
        assert await run_row(db, run_id) == before
        assert await events(db, run_id) == []
        assert await audit_actions(db, run_id) == []
        assert runner.cancels == []


async def test_cancel_running_run_supervised_here(db: Database) -> None:
    world = await new_world(db)
    run_id = await seed_run(db, world, status="running")
    runner = FakeRunner(db, local=True)
    started = time.monotonic()
    run = await run_control.cancel_run(
        db, runner, board(world.company_id), cancel_request(run_id, "stop it")
    )
    assert runner.cancels == [(run_id, "stop it")]
    # Returned once the executor finalized (woken by its terminal event).
    assert run.status == pb.RUN_STATUS_CANCELLED and run.error == "stop it"
    assert time.monotonic() - started < 1.5
    assert await audit_actions(db, run_id) == ["run.cancelled"]


async def test_cancel_running_run_waits_bounded_for_the_executor(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = await new_world(db)
    run_id = await seed_run(db, world, status="running")

    class Stuck(FakeRunner):
        async def cancel(self, run_id: str, reason: str) -> bool:
            self.cancels.append((run_id, reason))
            return True  # ...but never finalizes

    monkeypatch.setattr(run_control, "CANCEL_WAIT_EXTRA_S", 0.2)
    monkeypatch.setattr(run_control, "DEFAULT_GRACE_SECONDS", 1)
    async with db.unit_of_work() as tx:
        await tx.execute(
            sql("UPDATE runs.heartbeat_runs SET grace_seconds = 1 WHERE id = :id"), {"id": run_id}
        )
    started = time.monotonic()
    run = await run_control.cancel_run(db, Stuck(), admin(), cancel_request(run_id))
    assert run.status == pb.RUN_STATUS_RUNNING
    assert 1.0 <= time.monotonic() - started < 3.0


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real ``sleep 60`` in its own session (its own process group)."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()


async def _reaped(proc: subprocess.Popen[bytes], seconds: float = 5.0) -> int | None:
    for _ in range(int(seconds / 0.02)):
        code = proc.poll()
        if code is not None:
            return code
        await asyncio.sleep(0.02)
    return None


async def test_cancel_adopted_run_on_this_host_kills_the_recorded_tree(
    db: Database, sleeper: subprocess.Popen[bytes]
) -> None:
    world = await new_world(db)
    run_id = await seed_run(db, world, status="running")
    created = psutil.Process(sleeper.pid).create_time()
    await set_process(
        db,
        run_id,
        host=socket.gethostname(),
        pid=sleeper.pid,
        pgid=os.getpgid(sleeper.pid),
        created=created,
    )
    await append(db, run_id, stdout(2))
    runner = FakeRunner()  # no local handle: adopted after a restart, say

    # The reaping of our child happens in the test, so kill_tree sees a zombie: wait in
    # parallel so the process is really gone.
    reaped = asyncio.create_task(_reaped(sleeper, 10))
    run = await run_control.cancel_run(
        db, runner, board(world.company_id), cancel_request(run_id, "operator stop")
    )
    assert runner.cancels == [(run_id, "operator stop")]
    assert await reaped == -15  # SIGTERM
    assert run.status == pb.RUN_STATUS_CANCELLED and run.error_code == "cancelled"
    assert not psutil.pid_exists(sleeper.pid) or psutil.Process(sleeper.pid).create_time() != (
        created
    )
    last = (await events(db, run_id))[-1]
    assert last[0] == 3 and last[1] == "lifecycle" and '"terminal": true' in last[3]
    assert await audit_actions(db, run_id) == ["run.cancelled"]


async def test_cancel_run_on_another_host_notifies_its_node(
    db: Database, sleeper: subprocess.Popen[bytes]
) -> None:
    world = await new_world(db)
    run_id = await seed_run(db, world, status="running")
    await set_process(
        db,
        run_id,
        host="some-other-host.invalid",
        pid=sleeper.pid,
        pgid=sleeper.pid,
        created=psutil.Process(sleeper.pid).create_time(),
    )
    received: asyncio.Queue[str] = asyncio.Queue()
    conn = await asyncpg.connect(run_queries.database_dsn(db))
    try:
        await conn.add_listener(
            run_control.CANCEL_CHANNEL, lambda _c, _p, _ch, payload: received.put_nowait(payload)
        )
        run = await run_control.cancel_run(db, FakeRunner(), admin(), cancel_request(run_id))
        assert run.status == pb.RUN_STATUS_CANCELLED
        assert await asyncio.wait_for(received.get(), 3) == run_id
    finally:
        await conn.close()
    # Not ours to kill: the process on "another host" is left to its node.
    assert sleeper.poll() is None


async def test_cancel_loses_cleanly_to_a_concurrent_finalize(db: Database) -> None:
    world = await new_world(db)
    run_id = await seed_run(db, world, status="running")

    class FinalizesFirst(FakeRunner):
        async def cancel(self, run_id: str, reason: str) -> bool:
            await finish(db, run_id, "succeeded")  # the process exited on its own
            return False

    run = await run_control.cancel_run(db, FinalizesFirst(), admin(), cancel_request(run_id))
    assert run.status == pb.RUN_STATUS_SUCCEEDED
    assert [e[2] for e in await events(db, run_id)] == ["run succeeded"]
    assert await audit_actions(db, run_id) == []


async def test_cancel_authorization_and_validation(db: Database) -> None:
    world, other = await new_world(db), await new_world(db)
    mine = await seed_run(db, world, status="queued")
    theirs = await seed_run(db, world, status="queued")
    runner = FakeRunner()

    def call(actor: Any, run_id: str, reason: str = "") -> Awaitable[pb.Run]:
        return run_control.cancel_run(db, runner, actor, cancel_request(run_id, reason))

    denied = await expect(
        PermissionDenied, call(agent(world.agent_id, world.company_id, mine), theirs)
    )
    assert denied.reason == "AGENT_MISMATCH"
    denied = await expect(
        PermissionDenied, call(agent(other.agent_id, other.company_id, theirs), theirs)
    )
    assert denied.reason == "AGENT_MISMATCH"
    denied = await expect(PermissionDenied, call(board(world.company_id, Role.VIEWER), theirs))
    assert denied.reason == "COMPANY_ACCESS_DENIED"
    denied = await expect(PermissionDenied, call(board(other.company_id), theirs))
    assert denied.reason == "COMPANY_ACCESS_DENIED"
    bad = await expect(InvalidArgument, call(admin(), theirs, "x" * 501))
    assert fields(bad) == {"reason"}
    bad = await expect(InvalidArgument, call(admin(), "123"))
    assert fields(bad) == {"run_id"}
    missing = await expect(NotFound, call(admin(), str(uuid.uuid4())))
    assert missing.reason == "RUN_NOT_FOUND"
    assert (await run_row(db, theirs))["status"] == "queued"  # nothing was written

    # An agent may cancel its own run; a service may cancel any.
    own = await call(agent(world.agent_id, world.company_id, mine), mine, "done early")
    assert own.status == pb.RUN_STATUS_CANCELLED
    assert (await call(service(), theirs)).status == pb.RUN_STATUS_CANCELLED


# --- ReportRunActivity ----------------------------------------------------------------


def activity(run_id: str) -> runs_pb2.ReportRunActivityRequest:
    return runs_pb2.ReportRunActivityRequest(run_id=run_id)


async def test_report_activity_clears_detached_and_touches(db: Database) -> None:
    world = await new_world(db)
    run_id = await seed_run(
        db,
        world,
        status="running",
        error_code="process_detached",
        error="Lost in-memory process handle, but child pid 4242 is still alive",
    )
    runner = FakeRunner()
    actor = agent(world.agent_id, world.company_id, run_id)
    before = time.time()
    run = await run_control.report_run_activity(db, runner, actor, activity(run_id))
    assert run.status == pb.RUN_STATUS_RUNNING
    assert run.error_code == "" and run.error == ""
    assert run.last_activity_at.ToDatetime(UTC).timestamp() >= before - 1
    assert runner.touches == [run_id]
    [(_, kind, message, _)] = await events(db, run_id)
    assert (kind, message) == ("lifecycle", run_control.DETACHED_CLEARED_MESSAGE)

    # Again: no warning left to clear, so no event; the activity time moves on.
    first = run.last_activity_at.ToDatetime(UTC)
    await asyncio.sleep(0.01)
    again = await run_control.report_run_activity(db, runner, service(), activity(run_id))
    assert again.last_activity_at.ToDatetime(UTC) > first
    assert len(await events(db, run_id)) == 1
    assert runner.touches == [run_id, run_id]


async def test_report_activity_keeps_other_errors(db: Database) -> None:
    world = await new_world(db)
    run_id = await seed_run(db, world, status="running", error_code="something", error="kept")
    run = await run_control.report_run_activity(db, FakeRunner(), service(), activity(run_id))
    assert (run.error_code, run.error) == ("something", "kept")
    assert await events(db, run_id) == []


async def test_report_activity_refusals(db: Database) -> None:
    world, other = await new_world(db), await new_world(db)
    running = await seed_run(db, world, status="running")
    finished = await seed_run(db, world, status="succeeded")
    queued = await seed_run(db, world, status="queued")
    runner = FakeRunner()

    def call(actor: Any, run_id: str) -> Awaitable[pb.Run]:
        return run_control.report_run_activity(db, runner, actor, activity(run_id))

    for run_id in (finished, queued):
        error = await expect(
            FailedPrecondition, call(agent(world.agent_id, world.company_id, run_id), run_id)
        )
        assert error.reason == "RUN_NOT_RUNNING"
    for actor in (
        agent(world.agent_id, world.company_id, finished),  # its own agent, another run
        agent(other.agent_id, other.company_id, running),  # another agent
        board(world.company_id),
        admin(),
    ):
        error = await expect(PermissionDenied, call(actor, running))
        assert error.reason == "AGENT_MISMATCH"
    assert fields(await expect(InvalidArgument, call(service(), "zzz"))) == {"run_id"}
    missing = await expect(NotFound, call(service(), str(uuid.uuid4())))
    assert missing.reason == "RUN_NOT_FOUND"
    assert runner.touches == []
    assert (await run_row(db, running))["last_activity_at"] is None


# --- through the real RunService ------------------------------------------------------


async def test_rpc_cancel_and_report_activity(db: Database, suite: Suite) -> None:
    world = await new_world(db)
    queued = await seed_run(db, world, status="queued")
    running = await seed_run(db, world, status="running", error_code="process_detached")
    owner = suite.clients(board(world.company_id)).runs

    cancelled = await owner.CancelRun(runs_pb2.CancelRunRequest(run_id=queued, reason="no"))
    assert cancelled.status == pb.RUN_STATUS_CANCELLED and cancelled.error == "no"
    again = await owner.CancelRun(runs_pb2.CancelRunRequest(run_id=queued, reason="twice"))
    assert again == cancelled

    me = suite.clients(agent(world.agent_id, world.company_id, running)).runs
    touched = await me.ReportRunActivity(runs_pb2.ReportRunActivityRequest(run_id=running))
    assert touched.error_code == "" and touched.HasField("last_activity_at")
    other_run = await expect_error(
        me.ReportRunActivity(runs_pb2.ReportRunActivityRequest(run_id=queued))
    )
    assert other_run.code is grpc.StatusCode.PERMISSION_DENIED
    assert other_run.reason == "AGENT_MISMATCH"
    refused = await expect_error(
        suite.clients(service()).runs.ReportRunActivity(
            runs_pb2.ReportRunActivityRequest(run_id=queued)
        )
    )
    assert refused.code is grpc.StatusCode.FAILED_PRECONDITION
    assert refused.reason == "RUN_NOT_RUNNING"
    mismatch = await expect_error(me.CancelRun(runs_pb2.CancelRunRequest(run_id=queued)))
    assert mismatch.code is grpc.StatusCode.PERMISSION_DENIED
    assert mismatch.reason == "AGENT_MISMATCH"

    # Not executed by the suite's runner, no process recorded: cancelled here.
    ended = await owner.CancelRun(runs_pb2.CancelRunRequest(run_id=running))
    assert ended.status == pb.RUN_STATUS_CANCELLED
