"""The workspace service restarting: recorded
services are adopted when their process is alive and healthy, cleared otherwise, and
services whose desired state is running come back.

The first tests judge rows as a new supervisor of the same host would (a supervisor
object is what a new process builds); the last kills a real ``python -m
workspace_service`` process while its services run and starts another.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from common.actor import SYSTEM_ACTOR
from common.config import Settings
from common.db import Database
from common.sql import sql
from paperclip.issues.v1 import issues_pb2
from tests.conftest import Services
from tests.databases import fresh_database
from tests.e2e import service_processes
from tests.e2e.service_processes import ServiceProcesses
from tests.harness import admin, new_company
from tests.workspace_service.test_runtime_services import (
    MARKER,
    SERVER,
    alive,
    eventually,
    http_get,
    new_workspace,
    service_of,
    service_row,
    web,
)
from workspace_service import runtime_store, store
from workspace_service.model import RuntimeServiceRecord, WorkspaceRecord
from workspace_service.ports import free_port
from workspace_service.readiness import is_healthy
from workspace_service.runtime_services import ReconcileResult, RuntimeSupervisor


@pytest.fixture(scope="module")
async def company_id(services: Services) -> AsyncIterator[str]:
    yield (await new_company(services.suite.clients(admin()))).id
    service_processes.kill_agents(MARKER)  # a safety net after a failed test


@pytest.fixture
def host() -> str:
    """A host of this test alone: rows of other tests are not judged."""
    return f"restart-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def settings(services: Services) -> Settings:
    return services.workspace.settings


def spawn_server(port: int, log: Path, **env: str) -> psutil.Popen:
    """A dev server left running by an earlier workspace-service process."""
    with open(log, "ab") as out:
        return psutil.Popen(
            [sys.executable, str(SERVER), MARKER],
            env={**os.environ, "PORT": str(port), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def record_process(
    db: Database,
    workspace: WorkspaceRecord,
    proc: psutil.Popen,
    *,
    host: str,
    port: int,
    log: Path,
) -> RuntimeServiceRecord:
    """The ``running`` row that earlier process wrote for ``proc``."""
    command = service_of(workspace)
    async with db.unit_of_work() as tx:
        row = await runtime_store.upsert_service(
            tx, workspace=workspace, command=command, cwd=str(workspace.cwd), host=host
        )
        await runtime_store.mark_starting(
            tx,
            row.id,
            host=host,
            command=command,
            command_line=command.command,
            cwd=str(workspace.cwd),
            port=port,
            url=f"http://127.0.0.1:{port}/",
            run_id=None,
        )
        await runtime_store.record_spawn(
            tx,
            row.id,
            pid=proc.pid,
            pgid=proc.pid,
            create_time=proc.create_time(),
            log_path=str(log),
        )
        running = await runtime_store.mark_running(tx, row.id, pid=proc.pid)
    assert running is not None
    return running


async def test_scenario_29_reconcile_adopts_a_live_healthy_service_and_watches_it(
    db: Database, settings: Settings, company_id: str, host: str, tmp_path: Path
) -> None:
    workspace = await new_workspace(db, company_id, tmp_path, web())
    port, log = free_port(), tmp_path / "server.log"
    proc = spawn_server(port, log)
    row = await record_process(db, workspace, proc, host=host, port=port, log=log)
    await eventually(lambda: is_healthy(f"http://127.0.0.1:{port}/"), "the server to answer")
    supervisor = RuntimeSupervisor(db, settings, host)
    try:
        result = await supervisor.reconcile()

        assert result == ReconcileResult(reconciled=1, adopted=1, stopped=0)
        adopted = await service_row(db, row.id)
        assert (adopted.status, adopted.health_status, adopted.pid) == (
            "running",
            "healthy",
            proc.pid,
        )
        # Adopted means watched: its end is recorded though it is not our child.
        proc.kill()
        proc.wait()

        async def recorded() -> bool:
            return not (await service_row(db, row.id)).is_live

        await eventually(recorded, "the adopted process's end to be recorded")
        ended = await service_row(db, row.id)
        assert ended.status == "stopped" and ended.stopped_at is not None
        assert ended.last_error is not None and "exited while adopted" in ended.last_error
    finally:
        await supervisor.shutdown()
        with contextlib.suppress(psutil.Error):
            proc.kill()


async def test_scenario_29_reconcile_clears_a_dead_process_and_its_leftover_group(
    db: Database, settings: Settings, company_id: str, host: str, tmp_path: Path
) -> None:
    workspace = await new_workspace(db, company_id, tmp_path, web())
    port, log = free_port(), tmp_path / "server.log"
    proc = spawn_server(port, log, SPAWN_CHILD="1")
    row = await record_process(db, workspace, proc, host=host, port=port, log=log)
    await eventually(lambda: is_healthy(f"http://127.0.0.1:{port}/"), "the server to answer")
    _, body = await http_get(f"http://127.0.0.1:{port}/pids")
    child = json.loads(body)["child"]
    proc.kill()  # the leader dies; its child stays behind in the group
    proc.wait()
    operation = await _running_operation(db, workspace, host)

    result = await RuntimeSupervisor(db, settings, host).reconcile()

    assert result == ReconcileResult(reconciled=1, adopted=0, stopped=1)
    cleared = await service_row(db, row.id)
    assert (cleared.status, cleared.health_status) == ("stopped", "unknown")
    assert cleared.stopped_at is not None
    assert cleared.last_error == f"not adopted after a restart: process {proc.pid} is gone"
    assert alive({child}) == set()
    async with db.unit_of_work() as tx:
        op = await tx.fetchrow(
            sql("SELECT status, stderr FROM workspaces.workspace_operations WHERE id = :id"),
            {"id": operation},
        )
    assert op is not None and (op["status"], op["stderr"]) == (
        "failed",
        "workspace service restarted",
    )


async def test_scenario_21_restart_desired_starts_what_should_run_and_shutdown_keeps_it(
    services: Services, db: Database, company_id: str, host: str, tmp_path: Path
) -> None:
    wanted = {"desired_state": "running", "service_states": {"0": "running", "1": "stopped"}}
    workspace = await new_workspace(db, company_id, tmp_path, web("web"), web("api"))
    workspace = await _configure(db, workspace, wanted)
    elsewhere = await _configure(
        db, await new_workspace(db, company_id, tmp_path, web()), {"desired_state": "running"}
    )
    issue = await services.suite.clients(admin()).issues.CreateIssue(
        issues_pb2.CreateIssueRequest(
            company_id=company_id, title="closed", status=issues_pb2.ISSUE_STATUS_DONE
        )
    )
    closed = await _configure(
        db,
        await new_workspace(db, company_id, tmp_path, web(), source_issue_id=issue.id),
        {"desired_state": "running"},
    )
    # Scenario 21: a manual workspace starts nothing by itself.
    manual = await _configure(
        db, await new_workspace(db, company_id, tmp_path, web()), {"desired_state": "manual"}
    )
    targets = ((workspace, host), (elsewhere, "another-host"), (closed, host), (manual, host))
    for target, on in targets:
        for index in range(len(target.config["runtime"]["services"])):  # type: ignore[index]
            await _remember(db, target, index, on)
    supervisor = RuntimeSupervisor(db, services.workspace.settings, host)

    try:
        assert await supervisor.restart_desired() == 1
        web_row, api_row = await _rows(db, workspace)
        assert (web_row.status, web_row.health_status, api_row.status) == (
            "running",
            "healthy",
            "stopped",
        )
        assert web_row.url is not None and (await http_get(web_row.url))[0] == 200
        assert [r.status for r in await _rows(db, elsewhere)] == ["stopped"]
        assert [r.status for r in await _rows(db, closed)] == ["stopped"]
        assert [r.status for r in await _rows(db, manual)] == ["stopped"]
        assert await _operations(db, workspace) == [
            ("system", "workspace_provision", "succeeded", {"action": "start", "reason": "startup"})
        ]
    finally:
        await supervisor.shutdown()

    stopped = await service_row(db, web_row.id)
    assert (stopped.status, stopped.last_error) == ("stopped", "workspace service stopped")
    assert stopped.pid is not None and alive({stopped.pid}) == set()
    async with db.unit_of_work() as tx:
        config = await tx.fetchval(
            sql("SELECT config FROM workspaces.execution_workspaces WHERE id = :id"),
            {"id": workspace.id},
        )
    assert _json(config)["service_states"] == {"0": "running", "1": "stopped"}


async def _configure(
    db: Database, workspace: WorkspaceRecord, desired: dict[str, Any]
) -> WorkspaceRecord:
    async with db.unit_of_work() as tx:
        return await store.update_workspace(
            tx, workspace.id, {"config": {**(workspace.config or {}), **desired}}
        )


async def _remember(db: Database, workspace: WorkspaceRecord, index: int, host: str) -> None:
    """A stopped row of service ``index``: it ran on ``host`` before."""
    async with db.unit_of_work() as tx:
        await runtime_store.upsert_service(
            tx,
            workspace=workspace,
            command=service_of(workspace, index),
            cwd=str(workspace.cwd),
            host=host,
        )


async def _rows(db: Database, workspace: WorkspaceRecord) -> list[RuntimeServiceRecord]:
    async with db.unit_of_work() as tx:
        return await store.runtime_services(tx, workspace.id)


async def _operations(
    db: Database, workspace: WorkspaceRecord
) -> list[tuple[str, str, str, dict[str, Any]]]:
    async with db.unit_of_work() as tx:
        rows = await tx.fetch(
            sql(
                "SELECT actor_type, phase, status, metadata FROM workspaces.workspace_operations"
                " WHERE workspace_id = :id"
            ),
            {"id": workspace.id},
        )
    return [
        (
            r["actor_type"],
            r["phase"],
            r["status"],
            {k: v for k, v in _json(r["metadata"]).items() if k in ("action", "reason")},
        )
        for r in rows
    ]


async def _running_operation(db: Database, workspace: WorkspaceRecord, host: str) -> str:
    """An operation an earlier process of ``host`` left ``running``; its id."""
    actor_type, actor_id, _, _ = SYSTEM_ACTOR.audit_identity()
    async with db.unit_of_work() as tx:
        return str(
            await tx.fetchval(
                sql(
                    """
                    INSERT INTO workspaces.workspace_operations (
                        company_id, workspace_id, actor_type, actor_id, phase, command, host,
                        started_at
                    ) VALUES (
                        :company_id, :workspace_id, :actor_type, :actor_id,
                        'workspace_provision', 'true', :host, now() - interval '1 day'
                    ) RETURNING id
                    """
                ),
                {
                    "company_id": workspace.company_id,
                    "workspace_id": workspace.id,
                    "actor_type": actor_type,
                    "actor_id": actor_id,
                    "host": host,
                },
            )
        )


def _json(value: Any) -> Any:
    """A jsonb value as read (text or already decoded, depending on the codec)."""
    return json.loads(value) if isinstance(value, str) else value


@pytest.fixture(scope="module")
async def restart_db_url(server_url: str) -> AsyncIterator[str]:
    """A database of its own: the separate process judges every row of its host."""
    async with fresh_database(server_url, "paperclip_ws_restart") as url:
        yield url


async def test_killed_workspace_service_adopts_clears_and_restarts_on_its_next_start(
    restart_db_url: str, tmp_path: Path
) -> None:
    db = Database(restart_db_url, pool_size=4, max_overflow=4, name="ws-restart-test")
    home = tmp_path / "home"
    home.mkdir()
    processes = ServiceProcesses(
        restart_db_url, home, jwt_secret="ws-restart-test-jwt-secret-0123456789"
    )
    try:
        await _kill_and_restart(db, processes, tmp_path)
    finally:
        processes.stop()
        await db.dispose()
        service_processes.kill_agents(MARKER)


async def _kill_and_restart(db: Database, processes: ServiceProcesses, tmp_path: Path) -> None:
    host = socket.gethostname()  # what the separate process records its services under
    company = await _insert_company(db)
    running = {"desired_state": "running"}
    kept = await new_workspace(db, company, tmp_path, web(env={"SPAWN_CHILD": "1"}))
    kept = await _configure(db, kept, running)
    revived = await _configure(db, await new_workspace(db, company, tmp_path, web()), running)
    cleared = await new_workspace(db, company, tmp_path, web())
    for workspace in (kept, revived):
        await _remember(db, workspace, 0, host)
    gone = psutil.Popen(["sleep", "60"])
    await record_process(db, cleared, gone, host=host, port=free_port(), log=tmp_path / "gone.log")
    gone.kill()
    gone.wait()

    first = processes.start("workspace_service", "PAPERCLIP_WORKSPACE_SERVICE_ADDR")
    kept_row, revived_row = await _running(db, kept), await _running(db, revived)
    assert (await _rows(db, cleared))[0].status == "stopped"
    assert kept_row.url is not None and kept_row.pid is not None
    _, body = await http_get(f"http://127.0.0.1:{kept_row.port}/pids")
    kept_tree = {kept_row.pid, *json.loads(body).values()}

    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    revived_group = revived_row.pgid
    assert revived_group is not None
    os.killpg(revived_group, signal.SIGKILL)  # dies while nobody supervises it
    await eventually(lambda: _no_group(revived_group), "the killed service's group to be gone")
    assert (await http_get(kept_row.url))[0] == 200  # it outlived its supervisor

    processes.start("workspace_service", "PAPERCLIP_WORKSPACE_SERVICE_ADDR")
    back = await _running(db, revived, other_than=revived_row.pid)
    adopted = await service_row(db, kept_row.id)
    assert (adopted.status, adopted.pid) == ("running", kept_row.pid)
    assert (await http_get(kept_row.url))[0] == 200
    assert back.url is not None and (await http_get(back.url))[0] == 200
    startups = [op for op in await _operations(db, revived) if op[3].get("reason") == "startup"]
    assert [op[2] for op in startups] == ["succeeded", "succeeded"]

    processes.stop()  # SIGTERM: a graceful stop of the workspace service

    for row in (await service_row(db, kept_row.id), await service_row(db, back.id)):
        assert (row.status, row.last_error) == ("stopped", "workspace service stopped")
    assert alive(kept_tree | {back.pid or 0}) == set()
    for workspace in (kept, revived):
        async with db.unit_of_work() as tx:
            current = await store.get_workspace(tx, workspace.id)
        assert current is not None and current.config is not None
        assert current.config["desired_state"] == "running"


async def _running(
    db: Database, workspace: WorkspaceRecord, *, other_than: int | None = None
) -> RuntimeServiceRecord:
    """The workspace's service row once it runs (with a pid other than ``other_than``)."""

    async def ready() -> bool:
        [row] = await _rows(db, workspace)
        return row.status == "running" and row.pid != other_than

    await eventually(ready, f"the service of {workspace.id} to run", within=60)
    return (await _rows(db, workspace))[0]


async def _no_group(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


async def _insert_company(db: Database) -> str:
    async with db.unit_of_work() as tx:
        return str(
            await tx.fetchval(
                sql(
                    "INSERT INTO issues.companies (name, issue_prefix)"
                    " VALUES ('Restart', 'RST') RETURNING id"
                )
            )
        )
